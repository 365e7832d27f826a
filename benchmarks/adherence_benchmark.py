"""Does a report-conditioned model draw what its prompt says? Side, severity, negation, sex and view, read back by
the phantom classifier and the phantom location reader on `--num_images` images per cell (issue #54).

Each image's prompt is a phantom report (lunggen_diffusers/data/reports.py) of a patient drawn from a held-out seed:
its sex, age and view stated, and one finding asked for with its side, zone and size (the other findings unsaid),
or every finding negated; in the trained wordings and in the held-out ones no training report used. Cells:
- effusion small / effusion large (the same seeds and sides, right or left), consolidation, cardiomegaly: the
  finding read present; for effusion and consolidation, read on the side asked (among images where it is read);
  small against large: the large one's extent read above the small one's, pair by pair;
- negation (all four findings negated) beside the empty prompt: each finding read absent;
- every cell: sex and view read as stated.
Goals: asked present >= 0.90 (cardiomegaly, effusion, consolidation); negated absent >= 0.95 and at least as often
as with the empty prompt; side >= 0.95; small/large ordered >= 0.85; sex and view >= 0.95; held-out wordings within
0.05 of the trained ones. With `--baseline` (a label-conditioned model, `--labels_from train`) the Fréchet distance on
the classifier's features of both against held-out phantoms, the text model prompted with training-style reports.

    python benchmarks/adherence_benchmark.py --model demo-text --output adherence.json [--baseline cond-demo] \
        [--picture docs/text_prompts.png]

`--picture` draws the README's figure: each of a few prompts beside six images made from it (the same six seeds in
every row, so a row differs from the next by its prompt alone), marked synthetic.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.data.phantom import FINDINGS, Demographics, draw_phantom, phantom_dataset  # noqa: E402
from lunggen_diffusers.data.reports import HELD_OUT, PHRASINGS, TRAIN, phantom_report  # noqa: E402
from lunggen_diffusers.evaluation.metrics import frechet_distance  # noqa: E402
from lunggen_diffusers.evaluation.phantom_classifier import (  # noqa: E402
    FEMALE,
    LOCATION_OUTPUTS,
    OUTPUTS,
    VIEW_AP,
    load_classifier,
    load_location_reader,
)
from lunggen_diffusers.evaluation.stats import wilson  # noqa: E402
from lunggen_diffusers.generation.sampling import DEFAULT_STEPS, generate, load_pipeline  # noqa: E402
from lunggen_diffusers.utils import synthetic_png_info  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

HELD_OUT_SEED = 12345  # as the other phantom benchmarks: the demos train on seed 0
GOALS = {"present": 0.90, "absent": 0.95, "side": 0.95, "ordered": 0.85, "patient": 0.95, "held_out_gap": 0.05}
CELLS = ("effusion_small", "effusion_large", "consolidation", "cardiomegaly", "negation")
ASKED = {"effusion_small": "pleural_effusion", "effusion_large": "pleural_effusion",
         "consolidation": "consolidation", "cardiomegaly": "cardiomegaly"}


def cell_prompts(cell: str, phrasing: str, n: int) -> tuple[list[str], list[dict]]:
    """The prompts of a cell and what each asks: finding, side, sex, view. Image i's patient and side come from
    (seed, i) alone, so the two effusion cells and both wordings ask of the same patients on the same sides."""
    prompts, asked = [], []
    for i in range(n):
        rng = np.random.default_rng([HELD_OUT_SEED, i])
        patient = Demographics.draw(rng)
        side = ("right", "left")[int(rng.integers(2))]
        zone = ("upper", "middle", "lower")[int(rng.integers(3))]
        facts = {"effusion_small": {"pleural_effusion": {"side": side, "size": "small"}},
                 "effusion_large": {"pleural_effusion": {"side": side, "size": "large"}},
                 "consolidation": {"consolidation": {"side": side, "zone": zone}},
                 "cardiomegaly": {"cardiomegaly": {"severity": ("mild", "marked")[int(rng.integers(2))]}},
                 "negation": {}}[cell]
        wording = np.random.default_rng([HELD_OUT_SEED, i, PHRASINGS.index(phrasing), CELLS.index(cell)])
        prompts.append(phantom_report(facts, patient.sex, patient.age, patient.view, wording, phrasing,
                                      negation_prob=1.0 if cell == "negation" else 0.0))
        asked.append({"side": side, "sex": patient.sex, "view": patient.view})
    return prompts, asked


def share(hits: np.ndarray) -> dict:
    hits = np.asarray(hits, bool)
    low, high = wilson(int(hits.sum()), len(hits)) if len(hits) else (float("nan"), float("nan"))
    return {"share": float(hits.mean()) if len(hits) else float("nan"), "n": int(len(hits)),
            "interval": [low, high]}


def score(read: dict, where: dict, asked: dict) -> dict:
    """Every figure of one wording from the readings (`read[cell]` classifier, `where[cell]` location reader)."""
    index = {name: OUTPUTS.index(name) for name in OUTPUTS}
    loc = {name: LOCATION_OUTPUTS.index(name) for name in LOCATION_OUTPUTS}
    present = {cell: read[cell][:, index[f]] >= 0.5 for cell, f in ASKED.items()}
    result = {"present": {cell: share(hits) for cell, hits in present.items()}}
    result["absent"] = {f: share(read["negation"][:, index[f]] < 0.5) for f in FINDINGS}
    side = {}
    for cell in ("effusion_small", "effusion_large"):
        left = np.asarray([a["side"] == "left" for a in asked[cell]])
        on_left, on_right = (where[cell][:, loc[n]] >= 0.5 for n in ("effusion_left", "effusion_right"))
        side[cell] = share(np.where(left, on_left & ~on_right, on_right & ~on_left)[present[cell]])
    left = np.asarray([a["side"] == "left" for a in asked["consolidation"]])
    side["consolidation"] = share(((where["consolidation"][:, loc["consolidation_left"]] >= 0.5) == left)
                                  [present["consolidation"]])
    result["side"] = side
    both = present["effusion_small"] & present["effusion_large"]
    extent = loc["effusion_extent"]
    result["ordered"] = share((where["effusion_large"][:, extent] > where["effusion_small"][:, extent])[both])
    cells = [c for c in CELLS if c in read]
    female = np.concatenate([read[c][:, index[FEMALE]] >= 0.5 for c in cells])
    ap = np.concatenate([read[c][:, index[VIEW_AP]] >= 0.5 for c in cells])
    result["sex"] = share(female == np.asarray([a["sex"] == "F" for c in cells for a in asked[c]]))
    result["view"] = share(ap == np.asarray([a["view"] == "AP" for c in cells for a in asked[c]]))
    return result


def training_style_prompts(n: int, finding_prob: float) -> list[str]:
    """Reports as the training set writes them, of held-out phantoms (for the Fréchet distance)."""
    return list(phantom_dataset(n, 32, HELD_OUT_SEED, finding_prob)["report"])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A report-conditioned model (folder or Hub id).")
    parser.add_argument("--num_images", type=int, default=256, help="Images per cell.")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance_scale", type=float, default=None, help="Default: the model's own.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--baseline", default=None, help="A label-conditioned model to compare the FD with.")
    parser.add_argument("--output", default=None, help="Where to write the JSON result.")
    parser.add_argument("--picture", default=None, help="Where to draw prompts beside their images (a PNG).")
    args = parser.parse_args(argv)
    pipe, _ = load_pipeline(args.model)
    side = pipe.unet.config.sample_size
    classifier, reader = load_classifier(), load_location_reader()

    def images(prompts=None, model=pipe, **request):
        count = len(prompts) if prompts else args.num_images
        guidance = args.guidance_scale if model is pipe else None
        drawn = generate(model, count, HELD_OUT_SEED, num_inference_steps=args.steps, batch_size=args.batch_size,
                         output_type="np", prompts=prompts, guidance_scale=guidance, **request)
        return (drawn[..., 0] * 255).round().astype(np.uint8)

    if args.picture:
        picture([(prompt, images([prompt] * 6)) for prompt in PICTURE_PROMPTS], args.picture)
    result = {"model": args.model, "num_images": args.num_images, "steps": args.steps, "goals": GOALS}
    empty = images([""] * args.num_images)
    empty_read = classifier.predict(empty)
    result["empty_prompt_absent"] = {f: share(empty_read[:, OUTPUTS.index(f)] < 0.5) for f in FINDINGS}
    for phrasing in (TRAIN, HELD_OUT):
        read, where, asked = {}, {}, {}
        for cell in CELLS:
            prompts, asked[cell] = cell_prompts(cell, phrasing, args.num_images)
            drawn = images(prompts)
            read[cell], where[cell] = classifier.predict(drawn), reader.predict(drawn)
        result[phrasing] = score(read, where, asked)
    real = np.stack([draw_phantom(HELD_OUT_SEED, i, side, 0.5)[0] for i in range(1000, 1000 + args.num_images)])
    real_features = classifier.features(real)
    result["fd"] = {"text": frechet_distance(classifier.features(images(training_style_prompts(args.num_images, 0.5))),
                                             real_features)}
    if args.baseline:
        baseline, _ = load_pipeline(args.baseline)
        drawn = images(model=baseline, labels_from="train")
        result["fd"]["baseline"] = frechet_distance(classifier.features(drawn), real_features)
        result["fd"]["ratio"] = result["fd"]["text"] / result["fd"]["baseline"]
    return finish(result, args.output, table(result))


PICTURE_PROMPTS = ("No pleural effusion. No consolidation. Heart size is normal. PA view.",
                   "Large left pleural effusion. PA view.", "Large right pleural effusion. PA view.",
                   "Small right pleural effusion. PA view.", "Consolidation in the left lower zone. PA view.",
                   "Consolidation in the right upper zone. PA view.", "Marked cardiomegaly. AP view.",
                   "There is no pleural effusion. 70-year-old woman.")


def picture(rows: list[tuple[str, np.ndarray]], path: str) -> None:
    """Each prompt (left, wrapped) beside its images; "left" in a prompt is the patient's: the image's right."""
    tile, text_width = 96, 230
    width = text_width + tile * max(len(images) for _, images in rows)
    canvas = Image.new("L", (width, len(rows) * (tile + 4)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, images) in enumerate(rows):
        y = r * (tile + 4)
        for line, text in enumerate(textwrap.wrap(f'"{prompt}"', 36)):
            draw.text((4, y + 4 + 12 * line), text, fill=0)
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.BICUBIC),
                         (text_width + c * tile, y))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=synthetic_png_info("Synthetic chest X-rays generated from the prompts beside them by "
                                                 "a report-conditioned diffusion model (procedural phantom data); "
                                                 "not real patients; not for diagnosis."))


def table(result: dict) -> str:
    def cell(figure):
        return f"{figure['share']:.3f} [{figure['interval'][0]:.2f}, {figure['interval'][1]:.2f}] n={figure['n']}"

    lines = [f"{'figure':40s} {'trained wording':32s} held-out wording"]
    for kind in ("present", "side", "absent"):
        for name in result[TRAIN][kind]:
            lines.append(f"{kind + ' ' + name:40s} {cell(result[TRAIN][kind][name]):32s} "
                         f"{cell(result[HELD_OUT][kind][name])}")
    for kind in ("ordered", "sex", "view"):
        lines.append(f"{kind:40s} {cell(result[TRAIN][kind]):32s} {cell(result[HELD_OUT][kind])}")
    lines += [f"{'absent with the empty prompt ' + f:40s} {cell(v)}" for f, v in result["empty_prompt_absent"].items()]
    lines.append("FD on the classifier's features: " + ", ".join(f"{k} {v:.2f}" for k, v in result["fd"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
