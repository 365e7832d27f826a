"""What a utility run leaves behind: `utility.json`, `report.md`, `utility.png` and the model card's section.

Every number is on the real test split: per-finding AUROC averaged over the seeds, with a 95% interval from
resampling test patients (the same resamples for every regime, so the ratio and the gain have paired intervals).
Nothing here names a file, a folder or a patient: `card_section.md` goes onto a model card verbatim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..evaluation.stats import auroc, bootstrap_aurocs, interval
from ..utils import atomic_path, atomic_write_text, markdown_table, write_json
from .subgroups import subgroup_markdown

REGIMES = {
    "real": "real only (TRTR)",
    "synthetic": "synthetic only (TSTR)",
    "real+synthetic": "real + synthetic",
    "low-real": "low-data real",
    "low-real+synthetic": "low-data real + synthetic",
}
# One colour and marker per regime, the colours told apart under the common colour-vision deficiencies (Okabe-Ito).
STYLES = {
    "real": ((0, 114, 178), "circle"),
    "synthetic": ((213, 94, 0), "square"),
    "real+synthetic": ((0, 158, 115), "triangle"),
    "low-real": ((204, 121, 167), "diamond"),
    "low-real+synthetic": ((86, 180, 233), "cross"),
}


def summarize(test_labels: np.ndarray, test_patients: list[str], scores: dict[str, list[np.ndarray]],
              findings: list[str], num_resamples: int, seed: int) -> dict:
    """Per regime: per-finding and macro AUROC (mean over seeds) with patient-bootstrap 95% intervals; the TSTR /
    TRTR ratio and the low-data gain from synthetic data where both regimes ran."""
    names = list(scores)
    stacked = np.stack([s for name in names for s in scores[name]])  # (runs, N, findings)
    owner = np.array([i for i, name in enumerate(names) for _ in scores[name]])
    replicates = bootstrap_aurocs(test_labels, stacked, test_patients, num_resamples, seed)
    point = np.array([[auroc(test_labels[:, k], run[:, k]) for k in range(len(findings))] for run in stacked])
    out, macro_replicates = {}, {}
    for i, name in enumerate(names):
        runs = owner == i
        per_seed, boot = point[runs], replicates[:, runs].mean(axis=1)  # (seeds, findings), (resamples, findings)
        macro_replicates[name] = np.nanmean(boot, axis=1)
        out[name] = {
            "description": REGIMES[name],
            "per_finding": {f: {"auroc": float(per_seed[:, k].mean()), "ci95": interval(boot[:, k]),
                                "seeds": per_seed[:, k].tolist()} for k, f in enumerate(findings)},
            "macro": {"auroc": float(per_seed.mean()), "ci95": interval(macro_replicates[name]),
                      "seeds": per_seed.mean(axis=1).tolist()},
        }
    comparisons = {}
    pairs = {"tstr_trtr_ratio": ("synthetic", "real", np.divide),
             "low_data_gain": ("low-real+synthetic", "low-real", np.subtract)}
    for key, (a, b, op) in pairs.items():
        if a in out and b in out:
            comparisons[key] = {"value": float(op(out[a]["macro"]["auroc"], out[b]["macro"]["auroc"])),
                                "ci95": interval(op(macro_replicates[a], macro_replicates[b]))}
    return {"regimes": out, **comparisons}


def _ci(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['auroc']:.3f} [{low:.3f}, {high:.3f}]"


def results_table(result: dict) -> str:
    findings = result["data"]["findings"]
    rows = [[r["description"], _ci(r["macro"]), *(_ci(r["per_finding"][f]) for f in findings)]
            for r in result["regimes"].values()]
    return markdown_table(["regime", "macro AUROC [95% CI]", *findings], rows)


def _comparison_lines(result: dict) -> list[str]:
    lines = []
    if "tstr_trtr_ratio" in result:
        c = result["tstr_trtr_ratio"]
        lines.append(f"- TSTR / TRTR macro AUROC: **{c['value']:.3f}** [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] "
                     f"({(c['value'] - 1) * 100:+.1f}%)")
    if "low_data_gain" in result:
        c = result["low_data_gain"]
        lines.append(f"- Low-data regime, adding synthetic images: macro AUROC **{c['value']:+.3f}** "
                     f"[{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]")
    return lines


def _setup_line(result: dict) -> str:
    s, d = result["settings"], result["data"]
    classifier = (f"a linear probe on `{s['features']}` features" if s["classifier"] == "linear"
                  else "a transformers ResNet" + (" fine-tuned from a checkpoint" if s["pretrained"] else
                                                  f" ({'-'.join(map(str, s['hidden_sizes']))} channels, from scratch)"))
    return (f"Classifier: {classifier}, {s['resolution']} px, {s['max_steps']:,} optimizer steps of {s['batch_size']} "
            f"images in every regime, checkpoint chosen on real validation macro AUROC, {s['seeds']} seeds. "
            f"Real data: {d['real']}, split by patient; tested on {d['num_patients']['test']:,} real test patients "
            f"({d['num_images']['test']:,} images); synthetic: {d['num_images']['synthetic']:,} generated images "
            f"with their labels; low-data: {s['low_data_fraction']:.0%} of the real training patients. "
            f"95% intervals: {result['bootstrap']['resamples']:,} resamples of test patients.")


def _summary(result: dict) -> list[str]:
    """The lines the report and the card share: the table, the two comparisons, the setup, the subgroups."""
    lines = [results_table(result), "", *_comparison_lines(result), "", _setup_line(result), ""]
    return lines + (subgroup_markdown(result["subgroups"], REGIMES) if "subgroups" in result else [])


def card_section(result: dict) -> str:
    """The model card's `## Downstream utility` section: no paths, no patient IDs."""
    low = result["settings"]["low_data_fraction"]
    return "\n".join([
        "## Downstream utility",
        "",
        "Train-on-synthetic, test-on-real: the same classifier trained on real images (TRTR), on this model's "
        f"labeled synthetic images (TSTR), on both, and with {low:.0%} of the real patients with and without "
        "synthetic images; per-finding AUROC on real test patients no classifier or generator saw.",
        "",
        *_summary(result),
    ])


def report_markdown(result: dict) -> str:
    positives = result["data"]["test_positives"]
    runs = [[name, seed, step, f"{value:.3f}"] for name, r in result["runs"].items()
            for seed, step, value in zip(r["seeds"], r["best_steps"], r["best_validation"], strict=True)]
    return "\n".join([
        "# Downstream utility: train on synthetic, test on real",
        "",
        *_summary(result),
        "![AUROC per finding](utility.png)",
        "",
        "Test positives per finding: " + ", ".join(f"{f} {n:,}" for f, n in positives.items()) + ".",
        "",
        "## Runs",
        "",
        markdown_table(["regime", "seed", "chosen step", "validation macro AUROC"], runs),
        "",
        "Research use only, not for clinical use.",
        "",
    ])


def _marker(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, colour) -> None:
    box = (x - r, y - r, x + r, y + r)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=colour)
    else:
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=3)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=3)


def plot(result: dict) -> Image.Image:
    """AUROC per finding (x) from 0.5 to 1 (y), one marker per regime with its 95% interval, the macro mean last."""
    findings = result["data"]["findings"]
    columns = [*findings, "macro"]
    regimes = result["regimes"]
    font, small = ImageFont.load_default(size=15), ImageFont.load_default(size=13)
    left, top, right, bottom, column_width, height = 60, 40, 230, 70, 130, 360
    image = Image.new("RGB", (left + column_width * len(columns) + right, top + height + bottom), "white")
    draw = ImageDraw.Draw(image)

    def y_of(value: float) -> float:
        return top + height * (1.0 - (min(max(value, 0.5), 1.0) - 0.5) / 0.5)

    for tick in np.arange(0.5, 1.01, 0.1):
        y = y_of(tick)
        draw.line([(left, y), (left + column_width * len(columns), y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{tick:.1f}", fill="black", font=small, anchor="rm")
    draw.text((left, top - 22), "AUROC on real test patients (95% CI)", fill="black", font=font)
    draw.line([(left, top), (left, top + height), (left + column_width * len(columns), top + height)], fill="black")
    for c, column in enumerate(columns):
        centre = left + column_width * (c + 0.5)
        draw.text((centre, top + height + 10), column.replace("_", " "), fill="black", font=small, anchor="ma")
        for r, (name, regime) in enumerate(regimes.items()):
            colour, shape = STYLES[name]
            x = centre + (r - (len(regimes) - 1) / 2) * 18
            entry = regime["macro"] if column == "macro" else regime["per_finding"][column]
            low, high = entry["ci95"]
            draw.line([(x, y_of(low)), (x, y_of(high))], fill=colour, width=2)
            _marker(draw, shape, x, y_of(entry["auroc"]), 6, colour)
    legend_x = left + column_width * len(columns) + 20
    for r, name in enumerate(regimes):
        colour, shape = STYLES[name]
        y = top + 10 + 26 * r
        _marker(draw, shape, legend_x + 6, y, 6, colour)
        draw.text((legend_x + 20, y), REGIMES[name], fill="black", font=small, anchor="lm")
    return image


def write_report(output_dir: str | Path, result: dict) -> None:
    output_dir = Path(output_dir)
    write_json(output_dir / "utility.json", result)
    atomic_write_text(output_dir / "report.md", report_markdown(result))
    atomic_write_text(output_dir / "card_section.md", card_section(result))
    with atomic_path(output_dir / "utility.png") as temporary:
        plot(result).save(temporary)
