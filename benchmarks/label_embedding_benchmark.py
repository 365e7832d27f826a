"""How a conditional UNet should take its labels: a projected label vector or label tokens through cross-attention.

    python benchmarks/label_embedding_benchmark.py [--preset demo] [--steps 10] [--batch_size 16]

Same blocks, same resolution, one training step (forward, backward, AdamW) each, alternated so load drift hits all
variants alike. Prints parameters and median step time per variant and writes JSON.
- `unconditional`: today's UNet2DModel (the reference cost).
- `projection`: UNet2DConditionModel, class_embed_type="projection" (what the project uses).
- `cross_attention`: UNet2DConditionModel with cross-attention blocks where the plain ones attend, reading one
  learned token per label (the token table has to live outside the UNet, as a second component).
"""

import statistics
import time
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from transformers import HfArgumentParser

from lunggen_diffusers.config import from_dict  # noqa: E402
from lunggen_diffusers.training.model import build_unet  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

LABELS = 5  # the phantom's 4 findings and the null entry


@dataclass
class Arguments:
    preset: str = field(default="demo")
    steps: int = field(default=10, metadata={"help": "Timed steps per variant (after one warm-up step each)."})
    batch_size: int = field(default=16)
    output: str = field(default="benchmarks/results/label_embedding.json")


def variants(config):
    plain = build_unet(config)
    projection = build_unet(config, LABELS)
    blocks = dict(projection.config)
    blocks.update(
        down_block_types=[b.replace("AttnDownBlock2D", "CrossAttnDownBlock2D") for b in blocks["down_block_types"]],
        up_block_types=[b.replace("AttnUpBlock2D", "CrossAttnUpBlock2D") for b in blocks["up_block_types"]],
        class_embed_type=None, projection_class_embeddings_input_dim=None, cross_attention_dim=64,
    )
    cross = UNet2DConditionModel.from_config({k: v for k, v in blocks.items() if not k.startswith("_")})
    tokens = torch.nn.Embedding(LABELS, 64)
    return {
        "unconditional": (plain, [], lambda x, t, y: plain(x, t).sample),
        "projection": (projection, [], lambda x, t, y: projection(x, t, None, class_labels=y).sample),
        # Each label present contributes its token, scaled by its value (the null entry is a token of its own).
        "cross_attention": (cross, list(tokens.parameters()),
                            lambda x, t, y: cross(x, t, y.unsqueeze(-1) * tokens.weight).sample),
    }


def main():
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    config = from_dict({"preset": args.preset})
    torch.manual_seed(0)
    models = variants(config)
    res = config.data.resolution
    optimizers = {k: torch.optim.AdamW(list(m.parameters()) + extra, lr=1e-4) for k, (m, extra, _) in models.items()}
    times = {k: [] for k in models}
    for step in range(args.steps + 1):
        for name, (_, _, forward) in models.items():
            x = torch.randn(args.batch_size, 1, res, res)
            t = torch.randint(0, 1000, (args.batch_size,))
            y = (torch.rand(args.batch_size, LABELS) < 0.3).float()
            start = time.perf_counter()
            loss = forward(x, t, y).square().mean()
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:  # the first step of each is warm-up
                times[name].append(time.perf_counter() - start)
    result = {"preset": args.preset, "batch_size": args.batch_size, "variants": {}}
    print(f"{'variant':<16} {'parameters':>11} {'step (ms)':>10} {'vs unconditional':>17}")
    base = statistics.median(times["unconditional"])
    for name, (model, extra, _) in models.items():
        params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in extra)
        median = statistics.median(times[name])
        result["variants"][name] = {"parameters": params, "step_s": median, "ratio": median / base}
        print(f"{name:<16} {params:>11,} {median * 1000:>10.0f} {median / base:>16.2f}x")
    finish(result, args.output)


if __name__ == "__main__":
    main()
