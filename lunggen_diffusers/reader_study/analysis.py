"""`analyze`: what the readers' answers say, per reader and pooled, per arm, subgroup and experience group.

- Accuracy at telling real from synthetic (first readings; practice and repeats left out), Wilson 95% interval,
  exact binomial test against 0.5 (guessing).
- AUROC of the confidence ratings (synthetic-called-with-confidence-c scores +c, real -c), a bootstrap interval over
  images (every reading of a drawn image goes with it).
- Image quality 1-5, real against synthetic: means and Mann-Whitney U.
- Agreement: between readers on the images all of them read (Cohen's kappa for two, Fleiss' for more); of a reader
  with themself on the images shown twice.
- Findings: how often readers marked the finding a conditional image was asked for (and one it was not), and on
  real images the dataset's label.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..evaluation.stats import (
    auroc,
    binomial_test,
    bootstrap_aurocs,
    cohen_kappa,
    fleiss_kappa,
    interval,
    mann_whitney,
    wilson,
)
from ..utils import atomic_write_text, markdown_table, write_json
from . import store

CARD_SECTION = "card_section.md"
SUBGROUP_FIELDS = ("patient_sex", "view_position", "age_bin")


def load_reads(db) -> tuple[list[dict], dict]:
    """Every non-practice reading joined with the answer key and the reader, and the study's settings."""
    return store.readings(db), store.meta(db)


def score(read: dict) -> int:
    """The rating as a score of "synthetic": +confidence when called synthetic, -confidence when called real."""
    return read["confidence"] if read["call"] == "synthetic" else -read["confidence"]


def summarize(reads: list[dict], num_resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy (Wilson interval, binomial p), sensitivity and specificity for "synthetic", AUROC of the ratings
    (bootstrap over images) and quality real vs synthetic, of first readings."""
    n = len(reads)
    if not n:
        return {"readings": 0}
    correct = sum(r["call"] == r["origin"] for r in reads)
    synthetic = [r for r in reads if r["origin"] == "synthetic"]
    real = [r for r in reads if r["origin"] == "real"]
    labels = np.array([r["origin"] == "synthetic" for r in reads])
    scores = np.array([score(r) for r in reads], np.float64)
    area = auroc(labels, scores)
    low = high = float("nan")
    if not math.isnan(area) and num_resamples:
        replicates = bootstrap_aurocs(labels[:, None], scores[None, :, None], [r["image_id"] for r in reads],
                                      num_resamples, seed)[:, 0, 0]
        low, high = interval(replicates)
    u, p_quality = mann_whitney([r["quality"] for r in synthetic], [r["quality"] for r in real])
    return {
        "readings": n, "images": len({r["image_id"] for r in reads}), "correct": correct,
        "accuracy": correct / n, "accuracy_interval": wilson(correct, n), "p_binomial": binomial_test(correct, n),
        "sensitivity": _share(synthetic, lambda r: r["call"] == "synthetic"),
        "specificity": _share(real, lambda r: r["call"] == "real"),
        "auroc": area, "auroc_interval": (low, high),
        "quality_real": _mean([r["quality"] for r in real]),
        "quality_synthetic": _mean([r["quality"] for r in synthetic]),
        "quality_u": u, "quality_p": p_quality,
    }


def _share(reads, test) -> float:
    return sum(map(test, reads)) / len(reads) if reads else float("nan")


def _mean(values) -> float:
    return float(np.mean(values)) if values else float("nan")


def experience_group(years: float | None, cuts: list[float]) -> str:
    """`years` in the bins the cut points make: cuts [5, 10] -> "<5 y", "5-10 y", ">=10 y"."""
    if years is None:
        return "not given"
    bounds = [-math.inf, *cuts, math.inf]
    k = next(k for k in range(len(cuts) + 1) if years < bounds[k + 1])
    if k == 0:
        return f"<{cuts[0]:g} y"
    return f">={cuts[-1]:g} y" if k == len(cuts) else f"{cuts[k - 1]:g}-{cuts[k]:g} y"


def agreement_between(reads: list[dict]) -> dict:
    """Readers' calls on the images every reader read: Cohen's kappa for two readers, Fleiss' for more."""
    readers = sorted({r["reader"] for r in reads})
    calls = defaultdict(dict)
    for r in reads:
        calls[r["image_id"]][r["reader"]] = r["call"]
    shared = sorted(i for i, by in calls.items() if len(by) == len(readers))
    if len(readers) < 2 or not shared:
        return {"readers": len(readers), "images": len(shared), "kappa": float("nan"), "statistic": None}
    if len(readers) == 2:
        a, b = ([calls[i][name] for i in shared] for name in readers)
        return {"readers": 2, "images": len(shared), "kappa": cohen_kappa(a, b), "statistic": "Cohen"}
    table = np.array([[sum(c == k for c in calls[i].values()) for k in ("real", "synthetic")] for i in shared])
    return {"readers": len(readers), "images": len(shared), "kappa": fleiss_kappa(table), "statistic": "Fleiss"}


def agreement_within(all_reads: list[dict]) -> dict:
    """Each reader's first and second call on the images shown twice: Cohen's kappa and the share alike."""
    first, second = {}, defaultdict(list)
    for r in all_reads:
        key = (r["reader"], r["image_id"])
        if r["repeat"]:
            second[r["reader"]].append((first.get(key), r["call"]))
        else:
            first[key] = r["call"]
    out = {}
    for reader, pairs in second.items():
        pairs = [p for p in pairs if p[0] is not None]
        if pairs:
            a, b = zip(*pairs, strict=True)
            out[reader] = {"images": len(pairs), "kappa": cohen_kappa(a, b),
                           "agreement": sum(x == y for x, y in pairs) / len(pairs)}
    return out


def findings_seen(reads: list[dict], vocabulary: list[str]) -> dict:
    """Per finding: the share of readings that marked it, on synthetic images asked for it and not, and on real
    images labelled with it and not (Wilson intervals)."""
    out = {}
    for finding in vocabulary:
        cells = {}
        for origin, has in (("synthetic", "asked for"), ("real", "labelled")):
            for present in (True, False):
                group = [r for r in reads if r["origin"] == origin and r["asked"] is not None
                         and (finding in r["asked"]) == present]
                marked = sum(finding in r["seen"] for r in group)
                cells[f"{origin}, {has if present else 'not ' + has}"] = {
                    "readings": len(group), "marked": marked, "share": marked / len(group) if group else float("nan"),
                    "interval": wilson(marked, len(group))}
        out[finding] = cells
    return out


def analyze(folder, experience_cuts: list[float] = (5.0, 10.0), num_resamples: int = 1000, seed: int = 0) -> dict:
    """The whole analysis as one JSON-able dict."""
    with store.opened(folder) as db:
        all_reads, settings = load_reads(db)
        practice = store.practice_answers(db)
    reads = [r for r in all_reads if not r["repeat"]]
    cuts = sorted(experience_cuts)

    def block(selected):
        return summarize(selected, num_resamples, seed)

    by = defaultdict(dict)
    for name in sorted({r["reader"] for r in reads}):
        by["reader"][name] = block([r for r in reads if r["reader"] == name])
    for arm in settings["arms"]:
        by["arm"][arm] = block([r for r in reads if r["origin"] == "real" or r["arm"] == arm])
    for field in SUBGROUP_FIELDS:
        for value in sorted({r[field] for r in reads if r[field]}):
            by[field][value] = block([r for r in reads if r[field] == value])
    for group in sorted({experience_group(r["years"], cuts) for r in reads}):
        by["experience"][group] = block([r for r in reads if experience_group(r["years"], cuts) == group])
    return {
        "settings": {k: v for k, v in settings.items() if k != "organiser_token"},
        "practice_readings_left_out": practice, "repeat_readings": len(all_reads) - len(reads),
        "pooled": block(reads), "by": dict(by), "between_readers": agreement_between(reads),
        "within_reader": agreement_within(all_reads),
        "findings": findings_seen(reads, settings["vocabulary"]) if settings["ask_findings"] else None,
        "roc": roc_points(reads),
    }


def roc_points(reads: list[dict]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) of "synthetic" at every rating threshold, pooled."""
    labels = np.array([r["origin"] == "synthetic" for r in reads])
    scores = np.array([score(r) for r in reads])
    if not labels.any() or labels.all():
        return []
    points = [(0.0, 0.0)]
    for threshold in sorted(set(scores.tolist()), reverse=True):
        called = scores >= threshold
        points.append((float(called[~labels].mean()), float(called[labels].mean())))
    return points


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _row(name: str, s: dict) -> list:
    if not s.get("readings"):
        return [name, 0, "", "", "", "", ""]
    lo, hi = s["accuracy_interval"]
    a_lo, a_hi = s["auroc_interval"]
    return [name, s["readings"], f"{_fmt(s['accuracy'])} [{_fmt(lo)}, {_fmt(hi)}]", f"{s['p_binomial']:.3g}",
            f"{_fmt(s['auroc'])} [{_fmt(a_lo)}, {_fmt(a_hi)}]",
            f"{_fmt(s['quality_real'], 2)} / {_fmt(s['quality_synthetic'], 2)}", f"{_fmt(s['quality_p'], 3)}"]


HEADER = ["", "readings", "accuracy [95% CI]", "p (vs 0.5)", "AUROC of ratings [95% CI]",
          "quality real / synthetic", "p (Mann-Whitney)"]


def report_markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Reader study", "",
             f"{s['num_images']} images per reader ({s['per_arm']} synthetic per arm: {', '.join(s['arms'])}; as many "
             f"real), at {s['size']} px; {result['repeat_readings']} repeated readings and "
             f"{result['practice_readings_left_out']} practice readings left out of the accuracy figures. Accuracy: "
             "the share of readings that told real from synthetic correctly (0.5 is guessing), Wilson 95% interval, "
             "exact binomial test against 0.5. AUROC: of the confidence ratings, interval by bootstrap over images.",
             "", markdown_table(HEADER, [_row("all readers", result["pooled"])]
                                + [_row(name, v) for name, v in result["by"].get("reader", {}).items()]), ""]
    for key, title in (("arm", "Per arm"), ("experience", "Per experience group"), ("patient_sex", "Per sex"),
                       ("view_position", "Per view"), ("age_bin", "Per age")):
        if result["by"].get(key):
            lines += [f"## {title}", "", markdown_table(HEADER, [_row(k, v) for k, v in result["by"][key].items()]),
                      ""]
    between = result["between_readers"]
    lines += ["## Agreement", "",
              f"Between readers ({between['statistic'] or 'n/a'} kappa over {between['images']} images read by all "
              f"{between['readers']}): {_fmt(between['kappa'])}.", ""]
    if result["within_reader"]:
        lines += [markdown_table(["reader", "images shown twice", "kappa", "same call"],
                                 [[k, v["images"], _fmt(v["kappa"]), _fmt(v["agreement"])]
                                  for k, v in result["within_reader"].items()]), ""]
    if result["findings"]:
        columns = list(next(iter(result["findings"].values())))
        rows = [[f] + [f"{_fmt(c['share'], 2)} ({c['marked']}/{c['readings']})" for c in cells.values()]
                for f, cells in result["findings"].items()
                if any(c["readings"] for c in cells.values())]
        lines += ["## Findings marked", "", "Share of readings that marked each finding.", "",
                  markdown_table(["finding", *columns], rows), ""]
    lines += ["![accuracy per reader](accuracy.png) ![ROC of the ratings](roc.png)", ""]
    return "\n".join(lines)


def card_section(result: dict) -> str:
    """The model card's section: the pooled figures and one row per reader, numbered (names stay local)."""
    p = result["pooled"]
    if not p.get("readings"):
        return "## Reader study\n\nNo readings yet.\n"
    lo, hi = p["accuracy_interval"]
    readers = len(result["by"].get("reader", {}))
    return ("## Reader study\n\n"
            f"{readers} reader{'s' * (readers != 1)} judged {p['images']} images (half real, half generated by "
            f"this model) one at a time, blinded, with `lunggen-reader-study`. They told real from synthetic in "
            f"{_fmt(p['accuracy'])} of {p['readings']} readings (95% CI {_fmt(lo)} to {_fmt(hi)}; 0.5 is guessing, "
            f"p = {p['p_binomial']:.3g}); AUROC of their confidence ratings {_fmt(p['auroc'])}; image quality "
            f"{_fmt(p['quality_real'], 2)} for real and {_fmt(p['quality_synthetic'], 2)} for synthetic images "
            f"(1-5). Agreement between readers: kappa {_fmt(result['between_readers']['kappa'])}.\n\n"
            + markdown_table(HEADER, [_row("all readers", p)]
                             + [_row(f"reader {k}", v) for k, v in enumerate(result["by"].get("reader", {}).values(),
                                                                              1)]) + "\n"
            + "\nReaders are numbered, not named; their experience groups are in the study's own report.\n")


def accuracy_plot(result: dict) -> Image.Image:
    """Accuracy per reader and pooled with Wilson intervals, against 0.5 (guessing)."""
    rows = [("all readers", result["pooled"])] + list(result["by"].get("reader", {}).items())
    rows = [(name, s) for name, s in rows if s.get("readings")]
    width, left, top, step = 640, 170, 30, 26
    image = Image.new("RGB", (width, top + step * len(rows) + 40), "white")
    draw = ImageDraw.Draw(image)
    x = lambda v: left + v * (width - left - 20)  # noqa: E731
    bottom = top + step * len(rows)
    for v in (0, 0.25, 0.5, 0.75, 1):
        draw.line([(x(v), top - 8), (x(v), bottom)], fill="#999" if v == 0.5 else "#ddd")
        draw.text((x(v) - 8, bottom + 6), f"{v:.2f}", fill="black")
    draw.text((left, 6), "accuracy at telling real from synthetic (95% CI); 0.5 = guessing", fill="black")
    for k, (name, s) in enumerate(rows):
        y = top + step * k + step // 2
        lo, hi = s["accuracy_interval"]
        draw.text((6, y - 6), name[:24], fill="black")
        draw.line([(x(lo), y), (x(hi), y)], fill="#1f5fa8", width=2)
        draw.ellipse([x(s["accuracy"]) - 4, y - 4, x(s["accuracy"]) + 4, y + 4], fill="#1f5fa8")
    return image


def roc_plot(points: list[tuple[float, float]]) -> Image.Image:
    size, margin = 360, 40
    image = Image.new("RGB", (size + margin + 10, size + margin + 10), "white")
    draw = ImageDraw.Draw(image)
    xy = lambda f, t: (margin + f * size, 10 + (1 - t) * size)  # noqa: E731
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill="#999")
    if points:
        draw.line([xy(f, t) for f, t in points], fill="#1f5fa8", width=2)
    draw.text((margin, size + 20), "false positive rate (real called synthetic)", fill="black")
    draw.text((2, 2), "TPR", fill="black")
    return image


def write_report(result: dict, output_dir) -> Path:
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "report.json", result)
    atomic_write_text(folder / "report.md", report_markdown(result))
    atomic_write_text(folder / CARD_SECTION, card_section(result))
    accuracy_plot(result).save(folder / "accuracy.png")
    roc_plot(result["roc"]).save(folder / "roc.png")
    return folder


def planning_table(images=(50, 100, 200, 400), readers=(1, 3, 6, 10), accuracy: float = 0.6) -> list[list]:
    """Width of the pooled accuracy's Wilson 95% interval for `images` per reader and `readers`, at `accuracy`,
    taking readings as independent (readers who agree on an image make it wider: a floor)."""
    def width(readings: int) -> float:
        low, high = wilson(round(accuracy * readings), readings)
        return round(high - low, 3)

    return [[n] + [width(n * r) for r in readers] for n in images]
