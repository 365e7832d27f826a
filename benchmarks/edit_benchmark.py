"""Counterfactual editing against the true counterfactual, on the phantom (issue #43).

For each finding and direction, `--num_patients` held-out phantoms are drawn with and without the finding: the same
patient, the same anatomy and noise, so the image without it is the true counterfactual of the image with it, and the
other way round. Each is edited by each method (and strength); the shipped phantom classifier reads the result.

- success: the classifier reads the target (the finding there when added, gone when removed), Wilson 95%;
- the rest kept: mean absolute error (grey levels) and SSIM against the source outside the region where the source
  and its true counterfactual differ (dilated by one pixel);
- inside that region, the edit's distance to the truth over the source's (goal <= 0.5);
- heart side, sex and view read alike on the source and the edit.

Goals for the default method: success >= 0.90 for cardiomegaly, effusion and consolidation both ways; outside MAE <= 2
grey levels and SSIM >= 0.98; inside ratio <= 0.5; heart side, sex and view >= 0.99 kept. `--stress` also edits a
labelled test set (adds each finding to normals, removes it from positives) and reports the classifier's sensitivity
and specificity on the originals and on the edits, as RadEdit stress-tests a classifier.

    python benchmarks/edit_benchmark.py --model cond-demo --picture docs/edit_examples.png --stress

A text model (`--condition_on report`) is edited with prompts instead: adding a finding, from the empty prompt to the
sentence a report would write of this patient's true finding (its side, zone and size: "Consolidation in the left
lower zone."); removing it, from that sentence to its negation ("No consolidation.").

    python benchmarks/edit_benchmark.py --model text-demo --findings consolidation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from lunggen_diffusers.data.phantom import FINDINGS, draw_phantom  # noqa: E402
from lunggen_diffusers.data.reports import FINDING_SENTENCES, NEGATIONS, TRAIN, fill  # noqa: E402
from lunggen_diffusers.evaluation.metrics import ssim_map  # noqa: E402
from lunggen_diffusers.evaluation.phantom_classifier import (  # noqa: E402
    BINARY_OUTPUTS,
    FEMALE,
    HEART_RIGHT,
    VIEW_AP,
    load_classifier,
)
from lunggen_diffusers.evaluation.stats import wilson  # noqa: E402
from lunggen_diffusers.generation.editing import (  # noqa: E402
    DEFAULT_GUIDANCE_RISE,
    DEFAULT_METHOD,
    DEFAULT_STRENGTH,
    METHODS,
    auto_mask,
    edit,
)
from lunggen_diffusers.generation.sampling import image_side, load_pipeline, resolve_guidance  # noqa: E402

from common import finish  # noqa: E402  (beside this file)

HELD_OUT_SEED = 12345  # as sampler_benchmark.py: the demo trains on seed 0
GOALS = {"success": 0.90, "outside_mae": 2.0, "outside_ssim": 0.98, "inside_ratio": 0.5, "kept": 0.99}
GOAL_FINDINGS = ("cardiomegaly", "pleural_effusion", "consolidation")
SSIM_WINDOW = 7


def true_sentences(finding: str, num: int, side: int, start: int) -> tuple[list[str], str]:
    """(each patient's sentence of its true `finding`, in the first trained wording; the finding's negation)."""
    facts = [draw_phantom(HELD_OUT_SEED, start + i, side, 1.0, facts=True)[3][finding] for i in range(num)]
    template = FINDING_SENTENCES[finding][TRAIN][0]
    return [fill(template, {k: v for k, v in f.items() if isinstance(v, str)}) for f in facts], \
        NEGATIONS[finding][TRAIN][0]


def pairs(finding: str, num: int, side: int, start: int, finding_draw: int | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(without, with) the finding, uint8 (num, side, side): phantoms drawn with every finding, all others left out;
    `finding_draw` puts the finding where another draw of the patient would have it."""
    others = [f for f in FINDINGS if f != finding]
    without = [draw_phantom(HELD_OUT_SEED, start + i, side, 1.0, without=FINDINGS)[0] for i in range(num)]
    with_it = [draw_phantom(HELD_OUT_SEED, start + i, side, 1.0, without=others, finding_draw=finding_draw)[0]
               for i in range(num)]
    return np.stack(without), np.stack(with_it)


def region(source: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Where the source and its true counterfactual differ by more than 2 grey levels, one pixel wider."""
    changed = torch.from_numpy((np.abs(source.astype(np.int16) - truth) > 2).astype(np.float32))[:, None]
    return F.max_pool2d(changed, 3, stride=1, padding=1)[:, 0].numpy() > 0


def measure(source, edited, truth, inside, read_source, read_edited, read_truth, finding, add) -> dict:
    s, e, t = (a.astype(np.float64) for a in (source, edited, truth))
    outside = ~inside
    mae = (np.abs(e - s) * outside).sum((1, 2)) / np.maximum(outside.sum((1, 2)), 1)
    ssim = ssim_map(torch.from_numpy(e[:, None]), torch.from_numpy(s[:, None]), 255.0, SSIM_WINDOW)[:, 0].numpy()
    # Only windows wholly outside: one that reaches into the region measures the edit, not the rest.
    touched = F.max_pool2d(torch.from_numpy(inside[:, None].astype(np.float32)), SSIM_WINDOW, stride=1)[:, 0]
    centres = touched.numpy() == 0
    ssim_out = (ssim * centres).sum((1, 2)) / np.maximum(centres.sum((1, 2)), 1)
    to_truth = (np.abs(e - t) * inside).sum((1, 2)) / np.maximum(inside.sum((1, 2)), 1)
    source_to_truth = (np.abs(s - t) * inside).sum((1, 2)) / np.maximum(inside.sum((1, 2)), 1)
    column = BINARY_OUTPUTS.index(finding)
    success = (read_edited[:, column] >= 0.5) == add
    n = len(source)
    out = {"n": n, "success": float(success.mean()), "success_interval": list(wilson(int(success.sum()), n)),
           "outside_mae": float(mae.mean()), "outside_ssim": float(ssim_out.mean()),
           "inside_ratio": float(to_truth.sum() / max(source_to_truth.sum(), 1e-9)),
           "source_read_as_source": float(((read_source[:, column] >= 0.5) != add).mean())}
    for name in (HEART_RIGHT, FEMALE, VIEW_AP):
        c = BINARY_OUTPUTS.index(name)
        out[f"kept_{name}"] = float(((read_source[:, c] >= 0.5) == (read_edited[:, c] >= 0.5)).mean())
        # The classifier does not read every truth as it reads its source: beside "kept", as the truth is read.
        out[f"as_truth_{name}"] = float(((read_truth[:, c] >= 0.5) == (read_edited[:, c] >= 0.5)).mean())
    return out


def run_edits(pipe, images, source, target, method, strength, scale, steps, mask_kind, truth_masks, batch, seed,
              eta=0.0, guidance_rise=DEFAULT_GUIDANCE_RISE, per_image=False) -> tuple[np.ndarray, np.ndarray]:
    """(the edited images, uint8 (N, side, side); the guidance each was edited at)."""
    out, scales = [], []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch].astype(np.float32) / 255)[:, None]
        generator = torch.Generator().manual_seed(seed + start)
        # One request for every image, or (a text model's prompts, `per_image`) a list of one per image.
        src, tgt = (r[start:start + batch] if per_image and isinstance(r, list) else [r] * len(x)
                    for r in (source, target))
        mask = None
        if mask_kind == "auto":
            mask = auto_mask(pipe, x, src, tgt, generator=generator)
        elif mask_kind == "truth":
            mask = torch.from_numpy(truth_masks[start:start + batch].astype(np.float32))[:, None]
        if method == "repaint" and mask is None:
            raise ValueError("repaint needs --mask auto or truth")
        edited, used = edit(pipe, x, src, tgt, method, strength, scale, steps, mask, generator=generator, eta=eta,
                            output_type="pt", guidance_rise=guidance_rise, return_guidance=True)
        out.append(np.round(edited[:, 0].numpy() * 255).astype(np.uint8))
        scales += used
    return np.concatenate(out), np.array(scales)


def picture(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str) -> None:
    """One row per example: source | edited | truth | |edited - source|, labelled."""
    tile, label = 128, 14
    canvas = Image.new("L", (4 * tile, len(rows) * (tile + label)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, source, edited, truth) in enumerate(rows):
        difference = np.abs(edited.astype(np.int16) - source)
        difference = (difference / max(difference.max(), 1) * 255).astype(np.uint8)
        y = r * (tile + label)
        for c, (title, image) in enumerate((("source", source), ("edited", edited), ("truth", truth),
                                            ("|edited - source|", difference))):
            canvas.paste(Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST), (c * tile, y + label))
            draw.text((c * tile + 2, y + 1), f"{name}: {title}" if c == 0 else title, fill=0)
    canvas.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--num_patients", type=int, default=256)
    parser.add_argument("--first_patient", type=int, default=0,
                        help="index of the first held-out phantom: another set of patients to check a setting on "
                             "(HISTORY uses 20000; the stress test's are from 10000)")
    parser.add_argument("--findings", nargs="+", default=list(FINDINGS))
    parser.add_argument("--methods", nargs="+", default=[DEFAULT_METHOD], choices=METHODS)
    parser.add_argument("--strengths", nargs="+", type=float, default=None, help="default: each method's own")
    parser.add_argument("--mask", default="auto", choices=["auto", "truth", "none"])
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--eta", type=float, default=0.0, help="fresh noise on the way down, as lunggen-edit --eta")
    parser.add_argument("--guidance_rise", type=float, default=DEFAULT_GUIDANCE_RISE,
                        help="as lunggen-edit --guidance_rise (0: one pass at --guidance_scale)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--stress", action="store_true")
    parser.add_argument("--picture", default=None)
    parser.add_argument("--output", default="benchmarks/results/edit_benchmark.json")
    args = parser.parse_args()
    pipe, _ = load_pipeline(args.model, device="cpu")
    side, scale = image_side(pipe), resolve_guidance(pipe, args.guidance_scale)
    classifier = load_classifier()
    text = getattr(pipe, "text_encoder", None) is not None
    if text and args.stress:
        parser.error("--stress edits with labels: give a label-conditioned model")
    name = {f: f if text else pipe.labels.canonical([f])[0] for f in args.findings}
    results, examples, references = [], [], {}
    start_time = time.perf_counter()
    for finding in args.findings:
        without, with_it = pairs(finding, args.num_patients, side, args.first_patient)
        elsewhere = pairs(finding, args.num_patients, side, args.first_patient, finding_draw=0)[1]
        read = {"without": classifier.predict(without), "with": classifier.predict(with_it)}
        for add in (True, False):
            source, truth = (without, with_it) if add else (with_it, without)
            inside = region(source, truth)
            labels = ([], [name[finding]]) if add else ([name[finding]], [])
            if text:
                stated, negated = true_sentences(finding, args.num_patients, side, args.first_patient)
                labels = ("", stated) if add else (stated, negated)
            read_source, read_truth = (read["without"], read["with"]) if add else (read["with"], read["without"])
            # What the instrument reads on the truth itself (its ceiling), and, for an addition, the figures of a
            # perfect editor that does not know where this patient's finding would be: the same patient with the
            # finding where another draw puts it (a removal's truth does not depend on where it was).
            key = f"{finding} {'add' if add else 'remove'}"
            as_truth = measure(source, truth, truth, inside, read_source, read_truth, read_truth, finding, add)
            references[key] = {"truth": as_truth}
            if add:
                references[key]["another_site"] = measure(source, elsewhere, truth, inside, read_source,
                                                          classifier.predict(elsewhere), read_truth, finding, add)
            for method in args.methods:
                for strength in args.strengths or [DEFAULT_STRENGTH[method]]:
                    t0 = time.perf_counter()
                    edited, used = run_edits(pipe, source, *labels, method, strength, scale,
                                             args.num_inference_steps, args.mask, inside, args.batch_size, 0, args.eta,
                                             args.guidance_rise, per_image=text)
                    row = measure(source, edited, truth, inside, read_source, classifier.predict(edited), read_truth,
                                  finding, add)
                    row.update(finding=finding, direction="add" if add else "remove", method=method,
                               strength=strength, mask=args.mask, raised=float((used > scale).mean()),
                               mean_guidance=float(used.mean()), seconds=round(time.perf_counter() - t0, 1))
                    results.append(row)
                    print(json.dumps({k: row[k] for k in ("finding", "direction", "method", "strength", "success",
                                                          "outside_mae", "outside_ssim", "inside_ratio", "raised")}),
                          flush=True)
                    if method == args.methods[0] and strength == (args.strengths or [DEFAULT_STRENGTH[method]])[0]:
                        examples.append((f"{'+' if add else '-'}{finding}", source[0], edited[0], truth[0]))
    stress = None
    if args.stress:
        stress = {}
        for finding in args.findings:
            # A labelled test set: half normals, half positives; the edit flips each one's label.
            without, with_it = pairs(finding, args.num_patients // 2, side, 10_000)
            column = BINARY_OUTPUTS.index(finding)
            originals = np.concatenate([without, with_it])
            labels = np.r_[np.zeros(len(without)), np.ones(len(with_it))]
            settings = (args.methods[0], None, scale, args.num_inference_steps, args.mask)
            added, _ = run_edits(pipe, without, [], [name[finding]], *settings, region(without, with_it),
                                 args.batch_size, 0, args.eta, args.guidance_rise)
            removed, _ = run_edits(pipe, with_it, [name[finding]], [], *settings, region(with_it, without),
                                   args.batch_size, 0, args.eta, args.guidance_rise)
            edits = np.concatenate([added, removed])
            before, after = classifier.predict(originals)[:, column] >= 0.5, classifier.predict(edits)[:, column] >= 0.5
            flipped = 1 - labels
            stress[finding] = {"sensitivity_original": float(before[labels == 1].mean()),
                               "specificity_original": float((~before[labels == 0]).mean()),
                               "sensitivity_edited": float(after[flipped == 1].mean()),
                               "specificity_edited": float((~after[flipped == 0]).mean())}
    if args.picture:
        picture(examples, args.picture)
    default_strength = DEFAULT_STRENGTH[DEFAULT_METHOD]
    default = [r for r in results if r["method"] == DEFAULT_METHOD and r["strength"] == default_strength]
    met = {f"{r['finding']} {r['direction']}": {
        "success": r["success"] >= GOALS["success"] if r["finding"] in GOAL_FINDINGS else None,
        "outside": r["outside_mae"] <= GOALS["outside_mae"] and r["outside_ssim"] >= GOALS["outside_ssim"],
        "inside": r["inside_ratio"] <= GOALS["inside_ratio"],
        "kept": min(r[f"kept_{k}"] for k in (HEART_RIGHT, FEMALE, VIEW_AP)) >= GOALS["kept"]} for r in default}
    result = {"settings": vars(args), "guidance_scale": scale, "results": results, "references": references,
              "stress": stress, "goals": GOALS, "met": met, "seconds": round(time.perf_counter() - start_time, 1)}
    finish(result, args.output, json.dumps({"met": met, "stress": stress}, indent=2))


if __name__ == "__main__":
    main()
