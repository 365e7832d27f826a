"""Report-conditioned generation: the phantom's reports against its pixels, the tokenizer and text encoders (made here,
a user's CLIP or BERT stand-in), training and export (a LungGenPipeline with prompts; on the latent route a stock
StableDiffusionPipeline drawing what pipeline.py draws), the prompt CLI and its refusals."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from PIL import Image

from lunggen_diffusers import LungGenPipeline
from lunggen_diffusers.cli import UsageError
from lunggen_diffusers.data import reports
from lunggen_diffusers.data.phantom import draw_phantom, phantom_dataset
from lunggen_diffusers.generation.cli import main as generate_main
from lunggen_diffusers.generation.sampling import load_pipeline
from lunggen_diffusers.hub.privacy import files_to_upload
from lunggen_diffusers.lunggen_pipeline import decode_latents, encode_moments, sample_latents
from lunggen_diffusers.training.autoencoder import fold_standardisation
from lunggen_diffusers.training.diffusion import train
from lunggen_diffusers.training.text import load_text_model, train_tokenizer

TEXT = {"condition_on": ["report"], "phantom_finding_prob": 0.5, "text_encoder_hidden_size": 32,
        "text_encoder_layers": 1, "tokenizer_vocab_size": 200, "attention_resolutions": []}
LATENT = {"latent": True, "vae_block_out_channels": [8, 16], "vae_norm_num_groups": 8, "latent_channels": 4,
          "vae_max_train_steps": 2, "vae_train_batch_size": 4, "vae_learning_rate": 1e-3}


def test_a_phantom_report_states_the_patients_side_where_the_pixels_are():
    """The patient's right is the image's left: a report's "right pleural effusion" must be fluid at x < 0."""
    checked = 0
    for index in range(40):
        image, findings, _, facts = draw_phantom(3, index, 64, 0.6, facts=True)
        if "pleural_effusion" not in findings or facts["pleural_effusion"]["side"] == "bilateral":
            continue
        without = draw_phantom(3, index, 64, 0.6, without=["pleural_effusion"])[0]
        changed = np.abs(image.astype(int) - without.astype(int)).sum(0)
        image_left, image_right = changed[:32].sum(), changed[32:].sum()
        patient_right = facts["pleural_effusion"]["side"] == "right"
        assert (image_left > image_right) == patient_right
        checked += 1
    assert checked >= 5


def test_reports_follow_the_facts_vary_in_wording_and_keep_held_out_wordings_apart():
    data = phantom_dataset(300, 32, seed=5, finding_prob=0.5)
    texts = data["report"]
    assert texts == phantom_dataset(300, 32, seed=5, finding_prob=0.5)["report"]  # seeded
    for row in data.select(range(40)):
        _, findings, demo, facts = draw_phantom(5, int(row["patient_id"].rsplit("-", 1)[1]), 32, 0.5, facts=True)
        text = row["report"].lower()
        assert demo.view.lower() in text and str(int(demo.age)) in text
        for finding, fact in facts.items():
            assert fact["side" if "side" in fact else "severity"] in text, (finding, text)
    held_out = {t.split("{")[0] for f in reports.FINDING_SENTENCES.values() for t in f[reports.HELD_OUT]}
    held_out |= {n for f in reports.NEGATIONS.values() for n in f[reports.HELD_OUT]}
    assert not any(sentence in text for sentence in held_out if len(sentence) > 12 for text in texts)
    assert len({text.split(".")[0] for text in texts}) > 30  # the order and wording vary
    assert any("No pleural effusion." in t for t in texts) and any("There is" in t for t in texts)
    with pytest.raises(UsageError, match="phrasing 'casual'"):
        reports.phantom_report({}, "M", 40, "PA", np.random.default_rng(0), "casual")


def test_label_prompts_for_collections_without_reports():
    assert reports.label_prompt(["Cardiomegaly", "Effusion"], "F", 54, "PA") == \
        "Findings: Cardiomegaly, Effusion. PA view. 54-year-old woman."
    assert reports.label_prompt(["No Finding"], "M", float("nan"), None) == "No finding. Male patient."


def test_the_tokenizer_made_from_the_corpus_saves_and_reloads(tmp_path):
    texts = list(phantom_dataset(100, 32, seed=1, finding_prob=0.5)["report"])
    tokenizer = train_tokenizer(texts, 300)
    longest = max(len(ids) for ids in tokenizer(texts).input_ids)
    assert longest <= tokenizer.model_max_length <= 77 and tokenizer.model_max_length % 8 == 0
    tokenizer.save_pretrained(tmp_path / "tok")
    again = type(tokenizer).from_pretrained(tmp_path / "tok")
    assert again(texts[:5]).input_ids == tokenizer(texts[:5]).input_ids
    assert tokenizer("LEFT effusion").input_ids == tokenizer("left effusion").input_ids  # lower-cased


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from lunggen_diffusers.config import from_dict

    from fixtures import TINY

    out = tmp_path_factory.mktemp("text") / "out"
    result = train(from_dict({**TINY, **TEXT, "max_train_steps": 3, "output_dir": str(out)}))
    return out, result


def test_a_text_model_trains_exports_and_answers_prompts(text_model):
    out, result = text_model
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"][1] == "CLIPTextModel" and index["prompt_config"]["text_source"] == "phantom reports"
    assert {"text_encoder/config.json", "tokenizer/tokenizer.json", "prompt_config.json"} <= set(files_to_upload(out))
    pipe = LungGenPipeline.from_pretrained(out)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32

    def draw(prompt, **kwargs):
        return pipe(prompt=prompt, num_inference_steps=3, generator=torch.manual_seed(0), output_type="np",
                    **kwargs).images

    left, right = draw("Large left pleural effusion."), draw("Small right pleural effusion.")
    assert np.abs(left - right).max() > 0  # the prompt reaches the image
    assert np.array_equal(draw(""), draw("", guidance_scale=4.0))  # the empty prompt is the null condition: unguided
    assert not np.array_equal(draw("Marked cardiomegaly."), draw("Marked cardiomegaly.", negative_prompt="No nodule."))
    remote = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert np.array_equal(remote(prompt="Large left pleural effusion.", num_inference_steps=3,
                                 generator=torch.manual_seed(0), output_type="np").images, left)
    card = (out / "README.md").read_text()
    assert "Report-conditioned" in card and "Large left pleural effusion. PA view." in card


def test_text_refusals_are_one_line(text_model, tmp_path, caplog):
    out, _ = text_model
    pipe = LungGenPipeline.from_pretrained(out)
    long = " ".join(["Large left pleural effusion."] * 40)
    with caplog.at_level(logging.WARNING):
        pipe(prompt=[long, long], num_inference_steps=1, output_type="np")
    assert sum("longer than the text encoder takes" in r.message for r in caplog.records) == 1
    with pytest.raises(UsageError, match="2 negative prompts for 1 images"):
        pipe(prompt="x", negative_prompt=["a", "b"], num_inference_steps=1)
    label_model = LungGenPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    with pytest.raises(UsageError, match="a prompt was given to a model trained without text"):
        label_model(prompt="Large left pleural effusion.", num_inference_steps=1)
    from lunggen_diffusers.config import from_dict

    from fixtures import TINY

    with pytest.raises(UsageError, match="--caption_column 'findings_text': the training data has no such column"):
        train(from_dict({**TINY, **TEXT, "caption_column": "findings_text", "output_dir": str(tmp_path / "o")}))
    with pytest.raises(UsageError, match="--text_encoder and --train_text_encoder belong to a text model"):
        from_dict({**TINY, "text_encoder": "some/encoder"})


def test_pipeline_py_records_each_prompt_in_the_manifest_and_the_png(text_model, tmp_path, capsys):
    out, _ = text_model
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        csv.writer(f).writerows([["prompt"], ["Large left pleural effusion."], ["No pleural effusion."]])
    generate_main(["--model", str(out), "--prompts", str(prompts), "--num_images", "2", "--num_inference_steps", "2",
                   "--output_dir", str(tmp_path / "gen"), "--negative_prompt", "Marked cardiomegaly."])
    rows = list(csv.DictReader(open(tmp_path / "gen" / "manifest.csv")))
    assert [r["prompt"] for r in rows] == ["Large left pleural effusion.", "No pleural effusion."]
    assert rows[0]["negative_prompt"] == "Marked cardiomegaly."
    assert Image.open(tmp_path / "gen" / rows[1]["file"]).text["prompt"] == "No pleural effusion."
    with pytest.raises(SystemExit):
        generate_main(["--model", str(out), "--prompts", str(prompts), "--num_images", "3",
                       "--output_dir", str(tmp_path / "g2")])
    assert "2 prompts for --num_images 3" in capsys.readouterr().err


def test_the_standardisation_folds_into_the_autoencoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, layers_per_block=1).eval()
    vae.register_to_config(scaling_factor=1.3, latents_mean=[0.1, -0.2, 0.3], latents_std=[0.5, 2.0, 1.1])
    folded = fold_standardisation(vae)
    u, x = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(decode_latents(vae, u), folded.decode(u / 1.3).sample, atol=1e-5)
        assert torch.allclose(sample_latents(encode_moments(vae, x), vae.config),
                              folded.encode(x).latent_dist.mean * 1.3, atol=1e-5)
    assert folded.config.latents_mean is None and vae.config.latents_mean is not None


def test_a_latent_text_model_is_a_stock_stable_diffusion_pipeline(tmp_path):
    from lunggen_diffusers.config import from_dict

    from fixtures import TINY

    out = tmp_path / "out"
    train(from_dict({**TINY, **TEXT, **LATENT, "max_train_steps": 2, "output_dir": str(out),
                     "cache_dir": str(tmp_path / "cache")}))
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert not (out / "lunggen_pipeline.py").exists()  # no remote code
    stock = StableDiffusionPipeline.from_pretrained(out)
    assert isinstance(DiffusionPipeline.from_pretrained(out), StableDiffusionPipeline)
    ours, _ = load_pipeline(str(out))
    prompts = ["Large left pleural effusion.", "No effusion. PA view."]
    for scale in (1.0, 3.0):
        drawn = [pipe(prompt=prompts, num_inference_steps=3, guidance_scale=scale, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images for pipe in (stock, ours)]
        assert np.allclose(drawn[0], drawn[1], atol=1e-6)
    image = stock(prompt="Marked cardiomegaly.", num_inference_steps=2).images[0]
    assert image.mode == "L" and image.size == (32, 32)


def test_a_users_encoder_is_loaded_and_stays_frozen(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from lunggen_diffusers.config import from_dict

    from fixtures import TINY

    words = sorted({w.strip(".,").lower() for t in phantom_dataset(50, 32, 0, 0.5)["report"] for w in t.split()})
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-", *words]) + "\n")
    torch.manual_seed(0)
    BertTokenizerFast(vocab_file=str(vocab), model_max_length=64).save_pretrained(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=len(words) + 8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tokenizer, encoder = load_text_model(str(tmp_path / "bert"))
    assert encoder.config.use_attention_mask and tokenizer.model_max_length == 64
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = train(from_dict({**TINY, **TEXT, "text_encoder": str(tmp_path / "bert"), "max_train_steps": 2,
                              "output_dir": str(tmp_path / "out")}))
    pipe = LungGenPipeline.from_pretrained(result.output_dir)
    assert type(pipe.text_encoder).__name__ == "BertModel"
    assert all(torch.equal(before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    with pytest.raises(UsageError, match="no transformers text model there"):
        load_text_model(str(tmp_path / "nothing"))


def test_an_edit_toward_a_prompt_changes_only_where_the_mask_allows(text_model, tmp_path, capsys):
    from lunggen_diffusers.generation.edit import main as edit_main
    from lunggen_diffusers.generation.editing import edit

    out, _ = text_model
    pipe = LungGenPipeline.from_pretrained(out)
    image = draw_phantom(0, 1, 32, 0.0)[0].astype(np.float32)[None] / 255
    mask = np.zeros((1, 32, 32), np.float32)
    mask[:, 8:28, 16:30] = 1  # the patient's left lower lung: the image's right
    edited = edit(pipe, image, [""], ["Consolidation in the left lower zone."], num_inference_steps=4,
                  mask_image=mask, generator=torch.manual_seed(0), output_type="np", guidance_rise=0)[..., 0]
    assert np.array_equal(edited[mask == 0], image[mask == 0])  # outside: the source's pixels exactly
    assert np.abs(edited - image)[mask == 1].mean() > 0.005
    Image.fromarray((image[0] * 255).astype(np.uint8)).save(tmp_path / "cxr.png")
    for flags, message in ((["--prompt", "No effusion.", "--add", "nodule"], "give --prompt, or --add"),
                           (["--prompt", ""], "are the same")):
        with pytest.raises(SystemExit):
            edit_main(["--model", str(out), "--input", str(tmp_path / "cxr.png"), "--output_dir",
                       str(tmp_path / "e"), *flags])
        assert message in capsys.readouterr().err


def test_images_from_real_reports_are_recorded_as_such_and_never_pushed(text_model, tmp_path, capsys):
    import datasets

    from lunggen_diffusers.hub.dataset import dataset_files

    out, _ = text_model
    real = datasets.Dataset.from_dict({"patient_id": ["p1", "p2"], "report": ["Left effusion.", "Clear lungs."]})
    datasets.DatasetDict({"test": real}).save_to_disk(tmp_path / "real")
    phantom = datasets.Dataset.from_dict({"patient_id": ["phantom-0-1"], "report": ["No effusion. PA view."]})
    phantom.save_to_disk(tmp_path / "phantom")
    for name, source in (("real", "real reports"), ("phantom", "phantom reports")):
        generate_main(["--model", str(out), "--prompts_from", str(tmp_path / name), "--num_images", "1",
                       "--num_inference_steps", "1", "--output_dir", str(tmp_path / f"gen-{name}")])
        row = next(csv.DictReader(open(tmp_path / f"gen-{name}" / "manifest.csv")))
        assert row["prompt_source"] == source
    assert Image.open(tmp_path / "gen-real" / "image_000000.png").text["prompt_source"] == "real reports"
    with pytest.raises(UsageError, match="generated from reports of a real collection"):
        dataset_files(tmp_path / "gen-real", "me/synthetic")
    with pytest.raises(SystemExit):
        generate_main(["--model", str(out), "--prompts_from", str(tmp_path / "real:train"), "--num_images", "1",
                       "--output_dir", str(tmp_path / "g")])
    assert "no split 'train'" in capsys.readouterr().err
