"""Does the conditional demo's UNet learn a phantom finding once the loss pays for it? A diagnostic, phantom only.

    python benchmarks/finding_loss_weight.py --model cond-demo --finding nodule --weight 30 --output_dir nodule-x31
    python benchmarks/finding_probe.py --model nodule-x31 --finding nodule
    python benchmarks/fidelity_benchmark.py --model nodule-x31

Trains a fresh UNet of `--model`'s config on that model's own training phantoms, with its recipe (from its
`training_config.json`: optimizer, learning-rate schedule, steps, batch, EMA, condition dropout, prediction type),
except that the squared error on the finding's pixels is weighted 1 + `--weight`. The phantom knows where each
finding is (the image rendered without it differs there); real data sets do not, so this is a measurement of what
the model can learn, not a training option. Single process, CPU or one GPU. Writes `--model`'s folder with the new
UNet, which the probe and the fidelity benchmark read.
"""

import json
import os
import shutil
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from finding_probe import load_conditional  # noqa: E402  (beside this file)

from lunggen_diffusers.cli import run  # noqa: E402
from lunggen_diffusers.config import from_dict  # noqa: E402
from lunggen_diffusers.data.build import load_source  # noqa: E402
from lunggen_diffusers.data.phantom import FINDINGS, draw_phantom  # noqa: E402
from lunggen_diffusers.generation.sampling import model_label  # noqa: E402
from lunggen_diffusers.training.diffusion import diffusion_loss  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

CONTRAST_THRESHOLD = 0.05  # as finding_probe.py: the pixels the finding raises by more than this, in [-1, 1]


@dataclass
class WeightArguments:
    model: str = field(metadata={"help": "A conditional demo model folder trained on the phantom."})
    output_dir: str = field(metadata={"help": "Where the model with the re-trained UNet goes."})
    finding: str = field(default="nodule", metadata={"help": f"One of {', '.join(FINDINGS)}."})
    weight: float = field(default=30.0, metadata={"help": "Extra weight on the finding's pixels (0: the plain loss)."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Default: the model's own."})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads for torch."})


def phantom_masks(config, finding: str) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
    """The model's training phantoms in [-1, 1], the finding's pixels in each (zeros where it is absent), labels."""
    rows = load_source(config)[0].with_format(None)
    images, masks, labels = [], [], []
    for row in rows:
        pixels = np.asarray(row["image"], dtype=np.float32)
        drawn = [f for f in FINDINGS if row[f]]
        mask = np.zeros(pixels.shape, dtype=bool)
        if finding in drawn:
            _, seed, index = row["patient_id"].split("-")  # phantom-{seed}-{index}: the two numbers that render it
            without = draw_phantom(int(seed), int(index), config.data.resolution, config.data.phantom_finding_prob,
                                   without=[finding])[0]
            mask = (pixels - without) / 127.5 > CONTRAST_THRESHOLD
        images.append(pixels)
        masks.append(mask)
        labels.append(drawn)
    images = torch.from_numpy(np.stack(images)).unsqueeze(1).div(127.5).sub(1)
    return images, torch.from_numpy(np.stack(masks)).unsqueeze(1).float(), labels


def train(args: WeightArguments) -> dict:
    if args.weight < 0:
        raise ValueError(f"--weight {args.weight} must be >= 0 (0 is the plain loss)")
    pipe, _ = load_conditional(args.model, args.finding, args.num_threads)
    with open(os.path.join(args.model, "training_config.json")) as f:
        config = from_dict(json.load(f))
    if config.data.dataset_name or config.data.train_data_dir:
        raise ValueError(f"--model {model_label(args.model)!r} was not trained on the phantom")
    t = config.training
    steps = args.max_train_steps or t.max_train_steps
    images, masks, labels = phantom_masks(config, args.finding)
    class_labels, null = pipe.encode(labels, len(labels))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, masks, class_labels, null = (x.to(device) for x in (images, masks, class_labels, null[:1]))

    torch.manual_seed(t.seed)
    unet = UNet2DConditionModel.from_config(pipe.unet.config).to(device).train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon)
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=t.lr_warmup_steps,
                                 num_training_steps=steps)
    ema = EMAModel(unet.parameters(), decay=t.ema_max_decay, use_ema_warmup=True, inv_gamma=t.ema_inv_gamma,
                   power=t.ema_power)
    generator = torch.Generator(device).manual_seed(t.seed)
    for _ in tqdm(range(steps), desc="train"):
        batch = torch.randint(0, len(images), (t.train_batch_size,), generator=generator, device=device)
        clean, weight, labels_now = images[batch], 1 + args.weight * masks[batch], class_labels[batch]
        dropped = torch.rand(len(batch), generator=generator, device=device) < t.condition_dropout
        labels_now = torch.where(dropped[:, None], null, labels_now)
        noise = torch.randn(clean.shape, generator=generator, device=device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator,
                                  device=device)
        pred = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, encoder_hidden_states=None,
                    class_labels=labels_now).sample
        loss = diffusion_loss(pred, clean, noise, timesteps, scheduler, scheduler.config.prediction_type,
                              t.snr_gamma, pixel_weight=weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), t.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())
    shutil.copytree(args.model, args.output_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoint-*", "samples*", "logs"))
    unet.to("cpu").save_pretrained(os.path.join(args.output_dir, "unet"))
    return {"finding": args.finding, "weight": args.weight, "steps": steps, "images": len(images),
            "finding_pixels_per_image_with_it": float(masks.sum() / (masks.flatten(1).amax(1) > 0).sum())}


if __name__ == "__main__":
    (arguments,) = HfArgumentParser(WeightArguments).parse_args_into_dataclasses()
    outcome = run(lambda: train(arguments))
    finish(outcome, os.path.join(arguments.output_dir, "finding_loss_weight.json"), json.dumps(outcome, indent=2))
