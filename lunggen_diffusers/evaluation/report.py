"""The evaluation's outputs: metrics.json (everything, plus a non-identifying `model_card` section the Hub card
reads), report.md, nearest_pairs.png, memorized_patients.csv and reidentified_patients.csv. The last three show or
name training patients' data and stay on this machine."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

from ..utils import atomic_path, atomic_write_text, markdown_table, write_json
from .images import ImageSource
from .memorization import Audit

METRIC_NAMES = {"fd": "Fréchet distance", "kid": "KID", "kid_std": "KID std", "precision": "precision",
                "recall": "recall", "density": "density", "coverage": "coverage"}
LOCAL_ONLY = ("LOCAL ONLY - contains training patient identifiers. Never publish, upload, share or attach this file "
              "to a model card.")
TILE_RANGE = (128, 256)  # small images are enlarged so the labels fit; large ones shrunk to keep the PNG light


def nearest_pairs_image(fake: ImageSource, train: ImageSource, result: Audit, top_k: int,
                        size: int) -> Image.Image | None:
    """The top_k generated images most similar to a training image (flagged first, then by NCC), each beside the
    training image it matched, in rows of four pairs with the similarities written under them."""
    if top_k == 0:
        return None
    order = np.lexsort((-result.gen_ncc, -result.flagged.astype(int)))[:top_k]
    matched = result.matched_index()[order]
    tile = min(max(size, TILE_RANGE[0]), TILE_RANGE[1])
    gen = [Image.fromarray(a).resize((tile, tile), Image.Resampling.LANCZOS) for a in fake.read(order, size)]
    real = [Image.fromarray(a).resize((tile, tile), Image.Resampling.LANCZOS) for a in train.read(matched, size)]
    per_row, label_h, gap = 4, 26, 8
    rows = (len(order) + per_row - 1) // per_row
    canvas = Image.new("L", (per_row * (2 * tile + gap), rows * (tile + label_h + gap)), 255)
    draw = ImageDraw.Draw(canvas)
    for n, i in enumerate(order):
        x, y = (n % per_row) * (2 * tile + gap), (n // per_row) * (tile + label_h + gap)
        canvas.paste(gen[n], (x, y))
        canvas.paste(real[n], (x + tile, y))
        flag = "FLAGGED" if result.flagged[i] else "not flagged"
        draw.text((x + 2, y + tile + 1), f"#{n + 1} generated | training: {flag}", fill=0)
        draw.text((x + 2, y + tile + 13), f"NCC {result.gen_ncc[i]:.4f}  cosine {result.gen_cos[i]:.4f}", fill=0)
    return canvas


def _model_card_section(recipe: dict, counts: dict, metrics: dict, memorization: dict | None) -> dict:
    """Only aggregate numbers and settings: no path, no patient ID, no image."""
    local_model = Path(recipe["feature_model"]).exists()
    extractor = {"raddino": f"RAD-DINO CLS ({'local encoder' if local_model else recipe['feature_model']})",
                 "inception": "Inception-v3 pool3 (torch-fidelity, TF-compatible)",
                 "pixels": "downsampled pixels",
                 "phantom": "the phantom classifier's penultimate layer (phantom data only)"}[recipe["features"]]
    # FD and KID values are only comparable under one extractor, so their card names carry it ("fid" = Inception).
    suffix = {"raddino": "_rad_dino", "inception": "", "pixels": "_pixels", "phantom": "_phantom"}[recipe["features"]]
    names = {"fd": "fid" if recipe["features"] == "inception" else f"fd{suffix}", "kid": f"kid{suffix}"}
    pick = lambda d: {names.get(k, k): d[k] for k in METRIC_NAMES if k != "kid_std"}  # noqa: E731
    section = {
        "reference": f"held-out real images ({counts['real']}, {recipe['real_split']} for the floor)",
        "feature_extractor": extractor,
        "image_size": recipe["image_size"],
        "num_generated": counts["fake"],
        "num_real": counts["real"],
        "metrics": {**pick(metrics["fake_vs_real"]), "ms_ssim_generated": metrics["diversity"]["ms_ssim_fake"]},
        "real_vs_real_floor": {**pick(metrics["real_vs_real"]), "ms_ssim_real": metrics["diversity"]["ms_ssim_real"],
                               "generated_same_size": pick(metrics["fake_vs_real_half"])},
    }
    if memorization:
        keys = ("flagged_fraction", "null_flagged_fraction", "null_percentile", "num_flagged", "num_train",
                "num_null", "matched_by")
        section["memorization"] = {k: memorization[k] for k in keys}
    if "subgroups" in metrics:
        section["subgroups"] = subgroup_rows(metrics["subgroups"])
    if "reidentification" in metrics:
        section["reidentification"] = reid_card(metrics["reidentification"])
    return section


def reid_card(r: dict) -> dict:
    """The re-identification figures as the model and dataset cards show them: aggregates only."""
    share = lambda value, interval: f"{value:.2%} [{interval[0]:.2%}, {interval[1]:.2%}]"  # noqa: E731
    return {"generated above the threshold": share(r["share_generated"], r["share_generated_interval"]),
            "held-out real (null) above the threshold": share(r["share_null"], r["share_null_interval"]),
            "flagged": "yes" if r["flagged"] else "no",
            "threshold (best-match probability)": f"{r['threshold']:.4g}, exceeded by {r['false_match_rate']:.0%} "
                                                  f"of {r['num_calibration']} held-out images (calibration half)",
            "verifier": f"{r['verifier_backbone']}, AUROC {r['verifier_auroc']:.4f} on "
                        f"{r['verifier_held_out_patients']} held-out patients; same-patient pairs found "
                        f"{r['verifier_true_match_rate']:.3f} at a 1% pair false-match rate",
            "images": f"{r['num_generated']} generated, {r['num_null']} null ({r['num_null_patients']} patients), "
                      f"{r['num_train']} training ({r['num_train_patients']} patients)"}


def _interval_text(value: float, interval) -> str:
    return f"{value:.4g} [{interval[0]:.4g}, {interval[1]:.4g}]"


def subgroup_rows(report: dict) -> list[dict]:
    """One flat row per subgroup, aggregate numbers only (what the card and report.md show)."""
    rows = []
    for group, values in report["groups"].items():
        for value, e in values.items():
            row = {"subgroup": f"{group}={value}", "real images (patients)": f"{e['num_real']} "
                   f"({e['num_real_patients']})", "generated": e["num_fake"], "FD": _interval_text(e["fd"],
                                                                                                  e["fd_interval"]),
                   "FD, everyone at this size": f"{e['fd_everyone_same_size']:.4g}",
                   "FD gap": _interval_text(e["fd_gap"], e["fd_gap_interval"]), "KID": f"{e['kid']:.4g}",
                   "precision / recall": f"{e['precision']:.3f} / {e['recall']:.3f}",
                   "density / coverage": f"{e['density']:.3f} / {e['coverage']:.3f}"}
            for finding, r in e.get("findings", {}).items():
                row[f"{finding}: real / generated, gap"] = (f"{r['real']:.3f} / {r['fake']:.3f}, "
                                                            + _interval_text(r["gap"], r["gap_interval"]))
            row["flagged"] = ", ".join(f.split(": ", 1)[1] for f in report["flagged"]
                                       if f.startswith(f"{group}={value}: ")) or "no"
            rows.append(row)
    return rows


def _subgroup_markdown(report: dict) -> list[str]:
    rows = subgroup_rows(report)
    if not rows:
        return ["## Subgroups", "", "No subgroup holds enough images on both sides to report.", ""]
    lines = ["## Subgroups", "",
             f"Intervals: {report['level']:.2%} (95% Bonferroni-adjusted over every interval that can flag), "
             f"{report['num_resamples']} resamples of real patients and generated images. FD gap: the subgroup's "
             "FD minus everyone's at the subgroup's size; finding gap: the subgroup's (generated - real) rate minus "
             f"everyone's. Findings read by {report.get('findings_read_by', 'labels')}. Flagged: an interval that "
             "excludes 0.", ""]
    lines += [markdown_table(list(rows[0]), [list(row.values()) for row in rows]), ""]
    if report.get("demographic_agreement"):
        lines += ["### Generated images show the patient asked for (phantom classifier)", "",
                  markdown_table(["measure", "value"], list(report["demographic_agreement"].items())), ""]
    lines += [f"Flagged: {'; '.join(report['flagged']) or 'none'}.", ""]
    return lines


def _memorization_summary(result: Audit, recipe: dict, counts: dict, patients: list[dict]) -> dict:
    return {
        "flagged_fraction": float(result.flagged.mean()), "num_flagged": int(result.flagged.sum()),
        "null_flagged_fraction": float(result.null_flagged.mean()),
        "ncc_flagged_fraction": float((result.gen_ncc > result.ncc_threshold).mean()),
        "cos_flagged_fraction": float((result.gen_cos > result.cos_threshold).mean()),
        "null_percentile": result.percentile, "ncc_threshold": result.ncc_threshold,
        "cos_threshold": result.cos_threshold, "max_ncc": float(result.gen_ncc.max()),
        "max_cos": float(result.gen_cos.max()), "null_max_ncc": float(result.null_ncc.max()),
        "null_max_cos": float(result.null_cos.max()), "num_null": len(result.null_ncc), "num_train": counts["train"],
        "audit_size": recipe["audit_size"], "max_shift": recipe["max_shift"],
        "matched_by": recipe["matched_by"],
        "distinct_matched_with_flags": sum(1 for p in patients if p["flagged_matches"]),
    }


def _markdown(report: dict) -> str:
    r, c, m = report["recipe"], report["counts"], report["metrics"]
    lines = ["# Evaluation report", "", f"Generated `{r['fake']}` ({c['fake']}) against real `{r['real']}` "
             f"({c['real']}); training set for the audit: `{r['train']}` ({c['train']}).", "",
             f"- Features: {r['extractor']}", f"- Images: {r['grayscale']} ({r['image_size']} px).",
             f"- Real-vs-real floor: {r['real_split']} of the real set ({c['real_half_a']} / {c['real_half_b']} "
             "images); read every generated-vs-real number against it.",
             f"- PRDC k={r['k']}; KID {r['kid_subsets']} subsets of up to {r['kid_subset_size']}; MS-SSIM "
             f"{m['diversity']['scales']} scales on {r['diversity_pairs']} random pairs; seed {r['seed']}.", "",
             "## Distribution metrics", "",
             markdown_table(["metric", "generated vs real", f"generated ({c['real_half_b']}) vs real half A",
                             "real half B vs real half A (floor)"],
                            [[METRIC_NAMES[k], m["fake_vs_real"][k], m["fake_vs_real_half"][k], m["real_vs_real"][k]]
                             for k in METRIC_NAMES]), "",
             "The middle column uses as many generated images as half B, so FD and KID (biased by sample size) "
             "compare like with like against the floor.", "", "## Diversity (mean pairwise MS-SSIM, lower = more "
             "diverse)", "", markdown_table(["set", "MS-SSIM"], [["generated", m["diversity"]["ms_ssim_fake"]],
                                                         ["real", m["diversity"]["ms_ssim_real"]]]), ""]
    mem = report["memorization"]
    if mem is None:
        lines += ["## Memorization audit", "", "Not run: pass --train to audit generated images against it.", ""]
    else:
        lines += ["## Memorization audit", "",
                  f"Nearest of {mem['num_train']} training images for each generated image and, as the null, for "
                  f"each of {mem['num_null']} held-out real images. Pixel NCC on {mem['audit_size']}x"
                  f"{mem['audit_size']} images maximised over shifts up to {mem['max_shift']} px; cosine on the "
                  f"features. Flagged: either similarity above the null's {mem['null_percentile']}th percentile.", "",
                  markdown_table(["measure", "generated", "held-out null"],
                                 [["flagged (either)", mem["flagged_fraction"], mem["null_flagged_fraction"]],
                                  ["NCC threshold", mem["ncc_threshold"], ""],
                                  ["cosine threshold", mem["cos_threshold"], ""],
                                  ["max NCC", mem["max_ncc"], mem["null_max_ncc"]],
                                  ["max cosine", mem["max_cos"], mem["null_max_cos"]]]), "",
                  f"{mem['num_flagged']} generated image(s) flagged, matching {mem['distinct_matched_with_flags']} "
                  f"distinct training {mem['matched_by']}(s). ![closest pairs](nearest_pairs.png)", "",
                  "`nearest_pairs.png` (generated | training) and `memorized_patients.csv` show training data and "
                  "patient IDs: keep them local, never publish them.", ""]
    if "reidentification" in m:
        r = m["reidentification"]
        lines += ["## Re-identification risk", "",
                  "Each image's highest same-patient probability against every training image, by the patient "
                  "verifier; the share above the threshold, beside held-out real images of patients not in training "
                  "(the null: the held-out patients the threshold was not calibrated on; interval over patients). "
                  "Flagged: the generated share's lower 95% bound above the null's upper bound.", "",
                  markdown_table(["measure", "value"], list(reid_card(r).items())), "",
                  f"{r['num_above']} generated image(s) above the threshold, matching {r['patients_matched']} "
                  "training patient(s): `reidentified_patients.csv` names them (local only, never publish it).", ""]
    if "subgroups" in m:
        lines += _subgroup_markdown(m["subgroups"])
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {note}" for note in report["notes"]] + [""]
    return "\n".join(lines)


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        handle.write(f"# {LOCAL_ONLY}\n")
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)


def write_report(output_dir: Path, recipe: dict, counts: dict, metrics: dict, result: Audit | None,
                 patients: list[dict] | None, pairs: Image.Image | None, notes: list[str],
                 reid_rows: list[dict] | None = None) -> dict:
    output_dir.mkdir(parents=True, exist_ok=True)
    memorization = _memorization_summary(result, recipe, counts, patients) if result is not None else None
    report = {"recipe": recipe, "counts": counts, "metrics": metrics, "memorization": memorization, "notes": notes,
              "model_card": _model_card_section(recipe, counts, metrics, memorization)}
    write_json(output_dir / "metrics.json", report)
    atomic_write_text(output_dir / "report.md", _markdown(report))
    if pairs is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("Description", "Left of each pair: a SYNTHETIC image generated by a diffusion model; right: "
                                     "its nearest real training image (local only, never publish).")
        with atomic_path(output_dir / "nearest_pairs.png") as temporary:
            pairs.save(temporary, pnginfo=info)
    if patients is not None:
        _write_csv(output_dir / "memorized_patients.csv", patients,
                   ["patient_id", "flagged_matches", "nearest_matches", "train_images"])
    if reid_rows is not None:
        _write_csv(output_dir / "reidentified_patients.csv", reid_rows, ["image", "training_patient", "probability"])
    return report
