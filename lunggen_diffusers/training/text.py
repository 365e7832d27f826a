"""The text side of a report-conditioned model: a tokenizer and a `transformers` text encoder, either a user's
(`--text_encoder NAME_OR_PATH`: a CLIP text model, CXR-BERT, BiomedBERT, or a Stable Diffusion folder's
`text_encoder/` and `tokenizer/`) or, with none given, a small CLIP text transformer trained from scratch with a
byte-pair tokenizer trained on the training reports (`tokenizers`). Both are saved in the pipeline folder, so the
model loads anywhere without this package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from accelerate.logging import get_logger

from ..cli import UsageError
from ..config import Config
from ..lunggen_pipeline import encode_tokens, tokenize

logger = get_logger(__name__)

# CLIP's length, what Stable Diffusion's text encoders take: the most a tokenizer made here gives a prompt.
MAX_LENGTH = 77
SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A lowercase byte-pair tokenizer learnt from `texts`, wrapped as a transformers `PreTrainedTokenizerFast`
    (saved and reloaded like any other): every text becomes <s> ... </s>, padded with <pad> to a quarter more than
    the longest text takes (rounded up to 8, at most `MAX_LENGTH`): each token is a key of every cross-attention,
    and the phantom's reports take at most 44 of CLIP's 77."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    bos, eos = SPECIAL["bos_token"], SPECIAL["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))])
    longest = max((len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts))), default=2)
    max_length = min(MAX_LENGTH, 8 * math.ceil(1.25 * longest / 8))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, **SPECIAL)


def scratch_encoder(tokenizer, hidden_size: int, layers: int):
    """A small CLIP text transformer (the class Stable Diffusion loads) over `tokenizer`'s vocabulary, initialised
    at random."""
    from transformers import CLIPTextConfig, CLIPTextModel

    heads = max(1, hidden_size // 32)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id))
    # Unit-variance token embeddings (CLIP draws them at 0.02): each word a distinct random direction, which
    # position and the encoder's layers never drown. Frozen, this is a random-feature reading of the report that no
    # training can collapse (see build_text_model).
    torch.nn.init.normal_(encoder.get_input_embeddings().weight, std=1.0)
    return encoder


def load_text_model(name_or_path: str):
    """(tokenizer, encoder) of a user's text model: a Hub id or folder holding a transformers model, or a diffusers
    text-to-image folder (its `tokenizer/` and `text_encoder/`). A CLIP checkpoint gives its text half; any other
    encoder (BERT-like) is told to mask its padding, which Stable Diffusion's pipeline then honours too."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

    where = {"subfolder": "text_encoder"} if os.path.isdir(os.path.join(name_or_path, "text_encoder")) else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **where)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"subfolder": "tokenizer"} if where else {}))
    except OSError as error:
        raise UsageError(f"--text_encoder {name_or_path}: no transformers text model there ({error})") from None
    if config.model_type in ("clip", "clip_text_model"):
        encoder = CLIPTextModel.from_pretrained(name_or_path, **where)
    else:
        encoder = AutoModel.from_pretrained(name_or_path, **where)
        encoder.config.use_attention_mask = True
    if tokenizer.pad_token is None:
        raise UsageError(f"--text_encoder {name_or_path}: its tokenizer has no padding token")
    if tokenizer.model_max_length > 4096:  # "no limit" in transformers: take the encoder's positions
        tokenizer.model_max_length = getattr(encoder.config, "max_position_embeddings", MAX_LENGTH)
    return tokenizer, encoder


def build_text_model(config: Config, reports: Sequence[str]):
    """(tokenizer, encoder, trained) for `--condition_on report`: the user's model, or a tokenizer trained on
    `reports` and a random CLIP text transformer over it (`scratch_encoder`); either frozen unless
    `--train_text_encoder`.

    Made here, the encoder stays frozen by default because trained with the UNet from the first step it collapsed:
    on the phantom demo every report came out of it as nearly one vector (pooled distances 0.1-0.4 where the random
    encoder gives 3-5), and the model drew the same image whatever the prompt; frozen, the same recipe followed
    negations and findings within 600 steps (benchmarks/HISTORY.md, "Report conditioning")."""
    m = config.model
    if m.text_encoder:
        tokenizer, encoder = load_text_model(m.text_encoder)
    else:
        tokenizer = train_tokenizer(reports, m.tokenizer_vocab_size)
        encoder = scratch_encoder(tokenizer, m.text_encoder_hidden_size, m.text_encoder_layers)
    trained = bool(config.training.train_text_encoder)
    encoder.requires_grad_(trained)
    return tokenizer, encoder, trained


def token_table(tokenizer, reports: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of every report, int32 (N, max_length), tokenized once before training; the
    reports cut to the encoder's length are counted in one warning."""
    tokens = tokenize(tokenizer, reports, warn=logger.warning)
    return tokens.input_ids.numpy().astype(np.int32), tokens.attention_mask.numpy().astype(np.int32)


class TextConditionedUNet(torch.nn.Module):
    """The UNet and its text encoder as one trained module: one optimizer, one EMA, one checkpoint. A frozen
    encoder's weights ride along without gradients."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, sample, timestep, input_ids, attention_mask=None, class_labels=None):
        states = encode_tokens(self.text_encoder, input_ids, attention_mask)
        return self.unet(sample, timestep, encoder_hidden_states=states, class_labels=class_labels)
