"""Procedural frontal chest radiograph phantom: the built-in training set and the test data.

Coordinates are normalised to [-1, 1] with x to the image's right and y downwards. Radiological
convention: the patient's left is on the image's right, so the heart apex and gastric bubble sit at x > 0
and the (higher) right hemidiaphragm at x < 0. Each anatomical part adds to a density map (the line integral
of attenuation); the radiograph is 1 - exp(-k * density), so bone and soft tissue are bright, air is dark.
Edges are linear ramps about a pixel wide (wider above ~200 px, as real edges are a little soft), which
antialiases at any resolution without supersampling.

Each phantom is a patient with a sex, an age and a view, drawn at NIH ChestX-ray14's marginals (0.565 male; age
mean 47, sd 17, 4.8% under 18; 0.40 AP) and visible as in real films: women carry breast shadows over the lower
lung fields and a narrower frame; age calcifies the costal cartilages, thins the bones, unfolds the aorta, enlarges
the heart and flattens the domes, and a child has a round chest, horizontal ribs, a large heart and a thymus; an AP
(portable) film magnifies the heart, projects the scapulae over the lungs and the clavicles higher, is taken at a
poorer inspiration and usually carries a marker.

A patient may have several studies (`images_per_patient` above 1, NIH's mean is 3.64): the anatomy that is the
patient's own (body and lung shape, heart, rib spacing, the vessel pattern, where a nodule or effusion sits) stays,
while positioning, inspiration, exposure, noise, the view and the findings change from study to study.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..cli import UsageError, parse_args, run
from ..utils import image_grid, synthetic_png_info
from ..vocabulary import NO_FINDING, SUBGROUPS, age_bin
from .reports import REPORT_COLUMN, phantom_report

FINDINGS = ("cardiomegaly", "pleural_effusion", "nodule", "consolidation")
SEXES, VIEWS = ("M", "F"), ("PA", "AP")
MALE_SHARE, AP_SHARE, CHILD_SHARE = 0.565, 0.40, 0.048   # NIH ChestX-ray14, per image
# A patient's studies: 1 + a negative binomial of this shape (long-tailed); at NIH's mean of 3.64 it gives 57% of
# patients one image, 90% at most 9 (NIH: 57%, 8); capped where NIH's most-imaged patient is.
STUDIES_SHAPE, MAX_STUDIES = 0.22, 184
# What belongs to the patient and so is the same on every study; the other draws change between studies.
PATIENT_KEYS = ("body_w", "body_fat", "lung_a", "lung_top", "lung_gap", "dome_right", "dome_drop", "dome_k", "heart",
                "rib_spacing", "vessels", "effusion_side", "nodule_side", "nodule_pos", "nodule_r",
                "cardiomegaly_scale", "breast")
# Where and how large each finding is when present: draws of the patient that its image does not show without it.
FINDING_KEYS = {"cardiomegaly": ("cardiomegaly_scale",), "pleural_effusion": ("effusion_side", "effusion_level"),
                "nodule": ("nodule_side", "nodule_pos", "nodule_r"),
                "consolidation": ("consolidation_side", "consolidation_pos", "consolidation_r",
                                  "consolidation_texture")}


@dataclass(frozen=True)
class Demographics:
    """Who the phantom is: the columns a real collection's metadata gives (`patient_sex`, `patient_age`,
    `view_position`). The default is an adult man on a PA film, the reference every effect is measured from."""

    sex: str = "M"
    age: float = 45.0
    view: str = "PA"

    def __post_init__(self):
        if self.sex not in SEXES or self.view not in VIEWS or not 0 <= self.age <= 100:
            raise UsageError(f"demographics {self}: sex must be one of {SEXES}, view one of {VIEWS}, age in [0, 100]")

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Demographics":
        sex, child, view = (rng.random(3) < (1 - MALE_SHARE, CHILD_SHARE, AP_SHARE)).tolist()
        age = rng.uniform(1, 18) if child else float(np.clip(rng.normal(49, 15), 18, 95))
        return cls(SEXES[int(sex)], round(age, 1), VIEWS[int(view)])
MIN_RESOLUTION, MAX_RESOLUTION = 32, 1024


def _check_resolution(resolution: int) -> None:
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise UsageError(f"resolution must be an integer in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], got {resolution!r}")


def _check_findings(findings: Sequence[str]) -> None:
    if isinstance(findings, str):
        raise UsageError(f"findings must be a sequence of names from {FINDINGS}, got the string {findings!r}")
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise UsageError(f"unknown finding(s) {unknown}; accepted: {', '.join(FINDINGS)}")


def _ramp(inside: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of `inside > 0` for an approximate signed distance (positive inside)."""
    return np.clip(0.5 + inside / width, 0.0, 1.0)


def _ellipse(x, y, cx, cy, a, b, edge, angle=0.0):
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        x, y = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    else:
        x, y = x - cx, y - cy
    return _ramp(min(a, b) * (1.0 - np.sqrt((x / a) ** 2 + (y / b) ** 2)), edge)


def _band(dist: np.ndarray, half_width: float, edge: float) -> np.ndarray:
    """Soft indicator of |dist| < half_width: a bone or vessel of that half-thickness around a centre line."""
    return _ramp(half_width - np.abs(dist), edge)


def _bilinear(table: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Sample a small random table at fractional indices; j wraps (it is an angle), i is clamped."""
    n_i, n_j = table.shape
    i = np.clip(i, 0, n_i - 1.001)
    i0, j0 = np.floor(i).astype(np.intp), np.floor(j).astype(np.intp)
    fi, fj = i - i0, j - j0
    j0, j1 = j0 % n_j, (j0 + 1) % n_j
    top = table[i0, j0] * (1 - fj) + table[i0, j1] * fj
    bottom = table[i0 + 1, j0] * (1 - fj) + table[i0 + 1, j1] * fj
    return top * (1 - fi) + bottom * fi


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _sample_parameters(rng: np.random.Generator) -> dict:
    """Every random draw for one image, in a fixed order and count whatever the findings, so adding a
    finding changes only that finding and never the anatomy, exposure or noise."""
    u = rng.uniform
    return {
        "angle": np.deg2rad(u(-2.0, 2.0)), "shift": u(-0.03, 0.03, 2), "zoom": u(0.93, 1.05),
        "body_w": u(0.84, 0.94), "body_fat": u(0.9, 1.1),
        "lung_a": u(0.3, 0.33), "lung_top": u(-0.78, -0.7), "lung_gap": u(0.37, 0.4),
        "dome_right": u(0.34, 0.44), "dome_drop": u(0.09, 0.15), "dome_k": u(0.2, 0.3),
        "heart": u(-1, 1, 4), "rib_phase": u(-0.02, 0.02), "rib_spacing": u(0.13, 0.15),
        "exposure": u(1.1, 1.5), "gamma": u(0.85, 1.15), "gradient": u(-0.08, 0.08, 2),
        "noise": u(0.008, 0.025), "vessels": rng.standard_normal((7, 48)),
        "effusion_side": rng.integers(0, 3), "effusion_level": u(0.0, 0.25),
        "nodule_side": rng.integers(0, 2), "nodule_pos": u(-0.6, 0.6, 2), "nodule_r": u(0.025, 0.05),
        "consolidation_side": rng.integers(0, 2), "consolidation_pos": u(-0.6, 0.6),
        "consolidation_r": u(0.12, 0.2, 2), "consolidation_texture": rng.standard_normal((6, 12)),
        "cardiomegaly_scale": u(1.35, 1.5),
        "noise_seed": rng.integers(0, 2**63),
        "breast": u(0.7, 1.2, 2), "marker": u() < 0.8, "marker_x": u(-0.9, -0.6),
    }


def _with_demographics(p: dict, demo: Demographics) -> dict:
    """The anatomy parameters moved by who the patient is; effects are zero for the default `Demographics`."""
    female, ap = demo.sex == "F", demo.view == "AP"
    child = float(_smoothstep((18 - demo.age) / 14))          # 1 for an infant, 0 from 18 on
    old = float(np.clip((demo.age - 45) / 40, -0.5, 1))       # 0 at 45, 1 from 85
    p = dict(p)
    p["body_w"] *= (0.93 if female else 1.0) * (1 - 0.06 * child)
    p["body_fat"] *= 0.9 if female else 1.0
    p["lung_a"] *= 0.95 if female else 1.0
    # Older lungs are larger (the domes flatten); an AP film is taken at a poorer inspiration (higher domes).
    p["dome_right"] += 0.05 * old - 0.06 * ap
    p["heart_size"] = (1 + 0.13 * ap) * (1 + 0.08 * max(old, 0)) * (1 + 0.22 * child)
    p["child"], p["old"], p["ap"] = child, old, ap
    p["breast_size"] = p["breast"] * _smoothstep((demo.age - 11) / 7) if female else np.zeros(2)
    return p


def _density(x, y, p, findings, edge):
    """Line-integral density of one phantom on the grid (x, y), already rotated/shifted into body coordinates."""
    ax = np.abs(x)
    child, old, ap = p["child"], p["old"], p["ap"]
    # Body: torso with the trapezius sloping up into the neck; soft tissue is thickest in the middle.
    w = p["body_w"] - 0.05 * np.clip(y, 0, 1)
    top = -1.15 + 0.36 * _smoothstep((ax - 0.24) / 0.38)
    top = top + 0.2 - np.sqrt(np.clip(0.04 - np.clip(ax - w + 0.2, 0, None) ** 2, 0, None))  # round shoulders
    body = _ramp(y - top, edge) * _ramp(w - ax, edge)
    chord = np.sqrt(np.clip(1 - (x / (p["body_w"] + 0.08)) ** 2, 0, 1))
    density = p["body_fat"] * body * (0.3 + 0.7 * chord)

    # Lungs: an egg (narrow apex, wide base) per side reaching y = 1, cut by its diaphragm dome. The dome is
    # always the floor, and its crossing with the lateral wall makes the sharp costophrenic angle.
    lat = (ax - p["lung_gap"]) / p["lung_a"]                     # -1 medial .. +1 lateral edge of a lung
    v = (2 * y - p["lung_top"] - 1) / (1 - p["lung_top"])        # -1 at the apex .. +1 at y = 1
    width = 0.68 + 0.32 * _smoothstep((v + 1) / 1.4)
    shape = _ramp(p["lung_a"] * (1 - ((np.abs(lat) / width) ** 2.4 + np.abs(v) ** 2.4) ** (1 / 2.4)), edge)
    dome_top = np.where(x < 0, p["dome_right"], p["dome_right"] + p["dome_drop"])
    # Each dome peaks over the middle of its lung, falls steeply to the costophrenic angle and gently to the
    # heart; clipped at both ends so the liver and spleen edges stay inside the thorax.
    dome = dome_top + np.where(lat > 0.1, p["dome_k"], 0.05) * np.clip(lat - 0.1, -0.7, 0.9) ** 2
    lungs = shape * _ramp(dome - y, edge)
    abdomen = _ramp(y - dome, edge) * body

    # Heart: the left ventricle is a tilted ellipse whose apex points down and out to the image right
    # (patient's left); the right atrium makes the smaller convex border to the image left.
    h = p["heart"]
    scale = (p["cardiomegaly_scale"] if "cardiomegaly" in findings else 1.0) * p["heart_size"]
    hy = p["dome_right"] - 0.14 + 0.03 * h[3]
    lv_a, lv_b = (0.3 + 0.02 * h[0]) * scale, (0.21 + 0.015 * h[1]) * (1 + (scale - 1) * 0.5)
    lv_x = 0.17 + 0.02 * h[2] + 0.6 * (lv_a - 0.3)
    heart = np.maximum(_ellipse(x, y, lv_x, hy + 0.08 + 0.5 * (lv_b - 0.21), lv_a, lv_b, edge, angle=0.6),
                       _ellipse(x, y, -0.07 - 0.3 * (lv_a - 0.3), hy, 0.14 * scale, 0.17, edge))
    # Superior mediastinum (great vessels) widening into the heart, with the aortic knob to the image right.
    # Age unfolds the aorta (a larger knob further out); a child's thymus widens the upper mediastinum.
    right_border = 0.1 + 0.1 * _smoothstep((y + 0.2) / 0.35)
    mediastinum = _ramp(np.minimum(x + 0.09, right_border - x), edge)
    aorta = 1 + 0.5 * max(old, 0)
    knob = _ellipse(x, y, 0.07 + 0.04 * max(old, 0), -0.3, 0.11 * aorta, 0.08 * aorta, edge * 2)
    mediastinum = np.maximum(np.maximum(mediastinum, knob), heart)
    if child:
        mediastinum = np.maximum(mediastinum, child * _ellipse(x, y, 0.0, -0.32, 0.22, 0.16, edge * 2))
    trachea = _band(x + 0.01, 0.04, edge) * _ramp(-0.2 - y, edge)

    # Air replaces tissue: the lung is thickest at its base and centre.
    depth = 0.6 + 0.4 * _smoothstep((v + 1) / 1.2) * (1 - 0.4 * np.abs(lat) ** 4)
    air = lungs * (1 - mediastinum) * depth

    if "pleural_effusion" in findings:
        side = p["effusion_side"]                                 # 0 right, 1 left, 2 both
        on_side = (x < 0) if side == 0 else (x > 0) if side == 1 else 1.0
        # Meniscus: fluid climbs the lateral chest wall, with a hazy upper margin.
        meniscus = p["effusion_level"] + 0.25 * (1 - ((np.clip(lat, -1, 1) + 1) / 2) ** 2)
        fluid = on_side * lungs * _ramp(y - meniscus, max(edge, 0.05))
        air = air * (1 - fluid)

    # Vascular markings: streaks radiating from each hilum, fading towards the periphery.
    hilum_x = np.where(x < 0, -0.13, 0.13)
    r = np.sqrt((x - hilum_x) ** 2 + (y + 0.05) ** 2)
    # The angle fills the middle half of the table's columns on the image left and the outer half on the right,
    # so the two lungs get different vessels from one lookup.
    angle = (np.arctan2(y + 0.05, np.abs(x - hilum_x)) / np.pi + 1 + (x > 0)) * p["vessels"].shape[1] / 2
    streak = _bilinear(p["vessels"], r * 6, angle)
    vessels = np.clip(streak - 0.2, 0, None) * np.exp(-2.0 * r) * _smoothstep(r / 0.25) * lungs
    hila = _ellipse(ax, y, 0.18, -0.05, 0.07, 0.1, edge * 4) * (1 - mediastinum)

    density = (density - 0.85 * air + 0.1 * mediastinum * (1 - abdomen) - 0.45 * trachea
               + 0.3 * vessels + 0.2 * hila + 0.1 * abdomen)

    # Breast shadows over the lower lung fields, densest at the inferior fold.
    for side, size in zip((-1, 1), p["breast_size"], strict=True):
        if size:
            cx, cy = side * 0.47, p["dome_right"] - 0.05
            shadow = _ellipse(x, y, cx, cy, 0.3 * size, 0.22 * size, edge * 6) * _smoothstep((y - cy + 0.2) / 0.3)
            density = density + 0.22 * size * shadow * body

    # Spine: vertebral bodies down the midline, seen in the neck and through the mediastinum. Bones thin with age
    # and are less mineralised in children.
    bone = 1.15 - 0.3 * max(old, 0) - 0.25 * child
    spacing = p["rib_spacing"]
    endplates = 0.8 + 0.2 * np.cos(2 * np.pi * (y - p["rib_phase"]) / spacing)
    density = density + 0.2 * bone * _band(x, 0.065, edge) * endplates * body

    # Ribs: one warped coordinate t counts the ribs, so all twenty-odd arcs cost a few array ops.
    # Posterior ribs arch up and then sag at the chest wall; anterior ribs run down towards the sternum.
    s = np.clip((ax - 0.06) / 0.75, 0, 1.3)
    cage = _ramp(0.8 * (1 - ((ax / 0.82) ** 2.5 + np.abs((y + 0.02) / 0.82) ** 2.5) ** 0.4), edge)
    cage = cage * _ramp(ax - 0.07, edge) * body
    # A child's ribs run nearly horizontal.
    t_post = (y - p["lung_top"] - p["rib_phase"] + 0.04 * np.sin(np.pi * s) - 0.3 * (1 - 0.7 * child) * s**3) / spacing
    t_ant = (y - p["lung_top"] - 0.12 + 0.35 * (1 - 0.6 * child) * s) / (spacing * 1.1)
    post = _band(t_post - np.round(t_post), 0.17, edge / spacing) * (t_post > -0.5) * (t_post < 9.5)
    ant = _band(t_ant - np.round(t_ant), 0.25, edge / spacing) * (t_ant > 0.5) * (t_ant < 6.5)
    cartilage = 1 - _smoothstep((s - 0.25) / 0.2)
    density = density + cage * bone * (0.1 * post + 0.06 * ant * (1 - cartilage))
    # Costal cartilages calcify with age: the medial ends of the anterior ribs turn bright.
    density = density + 0.2 * max(old, 0) ** 1.5 * cage * ant * cartilage * (s > 0.02)

    sc = (ax - 0.08) / 0.62
    # Clavicles: gently S-shaped struts from the sternum up and out to the shoulders, projected higher on AP.
    clav_y = p["lung_top"] + 0.17 - 0.2 * sc + 0.025 * np.sin(2 * np.pi * sc) - 0.1 * ap
    clavicles = _band(y - clav_y, 0.035, edge) * _ramp(0.5 - np.abs(sc - 0.5), edge / 0.6)
    density = density + 0.35 * bone * clavicles * body
    # Humeral heads and scapulae at the shoulders: a PA film rotates the scapulae clear of the lungs, an AP film
    # leaves them over the upper lateral lung fields.
    density = density + 0.2 * bone * _ellipse(ax, y, w, -0.66, 0.1, 0.13, edge * 3) * body
    scapula = _ellipse(ax, y, 0.56 if ap else 0.72, -0.4, 0.14, 0.28, edge * 4, angle=0.3)
    density = density + (0.14 if ap else 0.05) * bone * scapula * body
    # Gastric bubble under the left (image right) hemidiaphragm.
    density = density - 0.2 * _ellipse(x, y, 0.36, p["dome_right"] + p["dome_drop"] + 0.15, 0.09, 0.05, edge * 2)

    lung_mid, lung_half = (p["lung_top"] + p["dome_right"]) / 2, (p["dome_right"] - p["lung_top"]) / 2
    if "nodule" in findings:
        nx = (1 if p["nodule_side"] else -1) * (p["lung_gap"] + p["lung_a"] * 0.5 * p["nodule_pos"][0])
        ny = lung_mid + lung_half * p["nodule_pos"][1]
        density = density + 0.3 * _ellipse(x, y, nx, ny, p["nodule_r"], p["nodule_r"], edge)
    if "consolidation" in findings:
        centre_x = (1 if p["consolidation_side"] else -1) * (p["lung_gap"] + p["lung_a"] * 0.2)
        centre_y = lung_mid + lung_half * p["consolidation_pos"]
        rx, ry = p["consolidation_r"]
        blob = np.exp(-(((x - centre_x) / rx) ** 2 + ((y - centre_y) / ry) ** 2) ** 2)  # fluffy, ill-defined
        texture = _bilinear(p["consolidation_texture"], (y + 1) * 2.5, (x + 1) * 5.5)
        density = density + 0.7 * blob * np.clip(0.75 + 0.35 * texture, 0, 1) * lungs
    return density


def phantom_parameters(rng: np.random.Generator, demographics: Demographics = Demographics(),
                       patient_rng: np.random.Generator | None = None,
                       finding_rng: np.random.Generator | None = None) -> dict:
    """Every draw of one phantom (`render_phantom` says where each comes from), before any pixel is rendered: the
    facts a report states (`finding_facts`) are read from the same numbers the image is drawn from."""
    p = _sample_parameters(rng)
    if patient_rng is not None:
        study = dict(p)
        patient = _sample_parameters(patient_rng)
        p.update({key: value for key, value in patient.items() if key in PATIENT_KEYS})
        # Inspiration moves the domes a little; the film's scale is mostly the patient's build and a little the
        # distance to the detector on the day.
        p["dome_right"] += 0.3 * (study["dome_right"] - 0.39)
        p["zoom"] = patient["zoom"] + 0.3 * (study["zoom"] - patient["zoom"])
    if finding_rng is not None:
        other = _sample_parameters(finding_rng)
        p.update({key: other[key] for keys in FINDING_KEYS.values() for key in keys})
    return _with_demographics(p, demographics)


def render_phantom(resolution: int, rng: np.random.Generator, findings: Sequence[str] = (),
                   demographics: Demographics = Demographics(),
                   patient_rng: np.random.Generator | None = None,
                   finding_rng: np.random.Generator | None = None) -> np.ndarray:
    """One phantom radiograph as uint8 (resolution, resolution); all randomness comes from `rng`, or, with
    `patient_rng`, the patient's own anatomy (`PATIENT_KEYS`) from that and the study's draws from `rng`; with
    `finding_rng`, the findings' sites and sizes (`FINDING_KEYS`) from that: the same image, the findings elsewhere."""
    _check_resolution(resolution)
    _check_findings(findings)
    return _render(resolution, phantom_parameters(rng, demographics, patient_rng, finding_rng), findings)


def _render(resolution: int, p: dict, findings: Sequence[str]) -> np.ndarray:
    coords = (np.arange(resolution) + 0.5) * (2.0 / resolution) - 1.0
    gx, gy = coords[None, :], coords[:, None]
    c, s = np.cos(p["angle"]), np.sin(p["angle"])
    x = (c * (gx - p["shift"][0]) + s * (gy - p["shift"][1])) / p["zoom"]
    y = (-s * (gx - p["shift"][0]) + c * (gy - p["shift"][1])) / p["zoom"]
    # Real edges are a little soft; below ~200 px the pixel itself sets the blur.
    edge = max(2.4 / resolution, 0.012)
    density = _density(x, y, p, set(findings), edge)
    if p["ap"] and p["marker"]:  # a portable film's "AP" marker, fixed to the detector, not the patient
        density = density + 1.5 * _ramp(0.04 - np.abs(gy + 0.86), edge) * _ramp(0.08 - np.abs(gx - p["marker_x"]), edge)
    density = np.clip(density, 0, None)
    image = (1 - np.exp(-p["exposure"] * density)) / (1 - np.exp(-p["exposure"] * 1.8))
    image = np.clip(image, 0, 1) ** p["gamma"] * (1 + p["gradient"][0] * gx + p["gradient"][1] * gy)
    noise = np.random.default_rng(p["noise_seed"]).standard_normal((resolution, resolution))
    image = image + p["noise"] * noise * np.sqrt(image + 0.02)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def _check_dataset_args(num_images, seed, finding_prob, start_index) -> None:
    for name, value, lowest in (("num_images", num_images, 1), ("seed", seed, 0), ("start_index", start_index, 0)):
        if not isinstance(value, (int, np.integer)) or value < lowest:
            raise UsageError(f"{name} must be an integer >= {lowest}, got {value!r}")
    if not 0.0 <= finding_prob <= 1.0:
        raise UsageError(f"finding_prob must be in [0, 1], got {finding_prob!r}")


def _check_scales(scales: dict[str, float]) -> None:
    for key, factor in scales.items():
        group, _, value = key.partition("=")
        if group not in SUBGROUPS or value not in SUBGROUPS[group] or not 0 <= factor:
            raise UsageError(f"finding scale {key}:{factor} (--phantom_finding_scale): a subgroup is one of "
                             f"{', '.join(f'{g}=' + '|'.join(v) for g, v in SUBGROUPS.items())}, its factor >= 0")


def subgroups_of(demographics: Demographics) -> list[str]:
    """The subgroup names a phantom patient belongs to, as `--subgroups` reads them from its columns."""
    return [f"patient_sex={demographics.sex}", f"age_bin={age_bin(demographics.age)}",
            f"view_position={demographics.view}"]


def _check_images_per_patient(images_per_patient: float) -> None:
    if not 1 <= images_per_patient <= 50:
        raise UsageError(f"images per patient {images_per_patient!r} (--phantom_images_per_patient): give a mean in "
                         "[1, 50] (NIH ChestX-ray14: 3.64)")


@lru_cache(maxsize=8)
def _first_images(seed: int, images_per_patient: float, num_patients: int) -> np.ndarray:
    """Index of each patient's first image (num_patients + 1 entries): the cumulative sum of the patients' study
    counts, drawn in one stream so they depend on (seed, mean) alone."""
    shape = STUDIES_SHAPE
    rng = np.random.default_rng([seed, 2])
    counts = 1 + np.minimum(rng.negative_binomial(shape, shape / (shape + images_per_patient - 1), num_patients),
                            MAX_STUDIES - 1)
    return np.concatenate([[0], np.cumsum(counts)])


def patients_of(seed: int, images_per_patient: float, start_index: int, stop_index: int) -> list[tuple[int, int]]:
    """(patient, study) of every image of the patients whose first image lies in [start_index, stop_index): whole
    patients only, so two sets over adjacent ranges never share one. One image per patient: image i is patient i."""
    if images_per_patient == 1:
        return [(index, 0) for index in range(start_index, stop_index)]
    num_patients = 1024
    while (first := _first_images(seed, images_per_patient, num_patients))[-1] <= stop_index:
        num_patients *= 2
    patients = range(np.searchsorted(first, start_index), np.searchsorted(first, stop_index))
    return [(patient, study) for patient in patients for study in range(first[patient + 1] - first[patient])]


def draw_phantom(seed: int, index: int, resolution: int, finding_prob: float, without: Sequence[str] = (),
                 finding_prob_scale: dict[str, float] | None = None, finding_draw: int | None = None,
                 facts: bool = False) -> tuple:
    """Image `index` of the set `seed`, from those two numbers alone so any subset can be regenerated, its
    findings and its patient. `without` renders the same image with those of its findings left out (the findings
    returned are still the ones it was drawn with): the difference is the finding's own pixels.
    `finding_prob_scale` ({"patient_sex=F": 0.5}) multiplies the finding probability within a subgroup: a planted
    bias for checking that subgroup reports find one. `finding_draw` k draws the findings' sites and sizes afresh
    (the k-th time): the same patient with its findings where another patient's would be. `facts` adds a fourth
    element, `finding_facts` of the findings drawn."""
    # The patient comes from its own stream, so the anatomy, findings and noise draws are those of the same index
    # whoever the patient is.
    demographics = Demographics.draw(np.random.default_rng([seed, index, 1]))
    finding_rng = None if finding_draw is None else np.random.default_rng([seed, index, 6, finding_draw])
    return _draw(np.random.default_rng([seed, index]), None, demographics, resolution, finding_prob, without,
                 finding_prob_scale, finding_rng, facts)


def draw_study(seed: int, patient: int, study: int, resolution: int, finding_prob: float,
               without: Sequence[str] = (), finding_prob_scale: dict[str, float] | None = None,
               facts: bool = False) -> tuple:
    """Study `study` of patient `patient` of the set `seed` (with several images per patient), as `draw_phantom`:
    the patient's anatomy, sex and birth year are the same on every study; the view, positioning, exposure and
    findings are drawn per study, about six months apart. Any study number is defined, beyond the ones the data
    set holds: another image of a training patient that no training set contains."""
    first = Demographics.draw(np.random.default_rng([seed, patient, 1]))
    rng = np.random.default_rng([seed, patient, study, 4])
    view = VIEWS[int(np.random.default_rng([seed, patient, study, 5]).random() < AP_SHARE)]
    demographics = Demographics(first.sex, round(min(first.age + 0.5 * study, 100.0), 1), view)
    return _draw(rng, np.random.default_rng([seed, patient, 3]), demographics, resolution, finding_prob, without,
                 finding_prob_scale, facts=facts)


def _draw(rng, patient_rng, demographics, resolution, finding_prob, without, finding_prob_scale, finding_rng=None,
          facts=False):
    scale = np.prod([(finding_prob_scale or {}).get(key, 1.0) for key in subgroups_of(demographics)])
    findings = [f for f, draw in zip(FINDINGS, rng.random(len(FINDINGS)), strict=True) if draw < finding_prob * scale]
    shown = [f for f in findings if f not in without]
    _check_resolution(resolution)
    _check_findings(shown)
    p = phantom_parameters(rng, demographics, patient_rng, finding_rng)
    drawn = _render(resolution, p, shown), findings, demographics
    return (*drawn, finding_facts(p, findings)) if facts else drawn


# Where a report's words divide the phantom's continuous draws: a nodule or consolidation's height in its lung
# (-1 apex .. 1 base, drawn in [-0.6, 0.6]) into zones, an effusion's meniscus level (drawn in [0, 0.25], lower is
# more fluid) and a nodule's radius and the heart's enlargement at the middle of their ranges.
ZONES = ((-0.2, "upper"), (0.2, "middle"), (np.inf, "lower"))
LARGE_EFFUSION_BELOW, LARGE_NODULE_FROM, MARKED_CARDIOMEGALY_FROM = 0.125, 0.0375, 1.425
SIDES = ("right", "left", "bilateral")  # the patient's: the effusion_side draw 0 fills the image's left (x < 0)


def _zone(height: float) -> str:
    return next(name for limit, name in ZONES if height < limit)


def finding_facts(p: dict, findings: Sequence[str]) -> dict[str, dict]:
    """What a radiologist would say of each finding present, from the draws it is rendered from: side (the
    patient's), zone and size, with the numbers behind them (an effusion's meniscus `level`, a lesion's `height` in
    its lung). The truth that reports state and the adherence benchmark checks."""
    facts = {}
    if "cardiomegaly" in findings:
        facts["cardiomegaly"] = {"severity": "marked" if p["cardiomegaly_scale"] >= MARKED_CARDIOMEGALY_FROM
                                 else "mild"}
    if "pleural_effusion" in findings:
        facts["pleural_effusion"] = {"side": SIDES[int(p["effusion_side"])],
                                     "size": "large" if p["effusion_level"] < LARGE_EFFUSION_BELOW else "small",
                                     "level": float(p["effusion_level"])}
    if "nodule" in findings:
        facts["nodule"] = {"side": SIDES[int(p["nodule_side"])], "zone": _zone(p["nodule_pos"][1]),
                           "size": "large" if p["nodule_r"] >= LARGE_NODULE_FROM else "small",
                           "height": float(p["nodule_pos"][1])}
    if "consolidation" in findings:
        facts["consolidation"] = {"side": SIDES[int(p["consolidation_side"])],
                                  "zone": _zone(p["consolidation_pos"]), "height": float(p["consolidation_pos"])}
    return facts


def phantom_dataset(num_images: int, resolution: int = 64, seed: int = 0, finding_prob: float = 0.0,
                    start_index: int = 0, finding_prob_scale: dict[str, float] | None = None,
                    images_per_patient: float = 1.0) -> datasets.Dataset:
    """`num_images` phantoms as a Dataset: image (PNG, mode L), patient_id, finding_labels, one bool per finding,
    the patient's patient_sex ("M"/"F"), patient_age (years) and view_position ("PA"/"AP"), and its `report`
    (`reports.phantom_report`, the trained wordings).

    `finding_prob` is the independent probability of each finding (times `finding_prob_scale` in a subgroup, see
    `draw_phantom`). With one image per patient (the default) image i is image `start_index + i` of the set `seed`
    and its own patient. With `images_per_patient` above 1 (a mean; see `patients_of`) the set holds every study of
    the patients whose first image falls in [start_index, start_index + num_images), so about `num_images` images,
    and a set that starts where another ends shares no patient with it.
    """
    _check_resolution(resolution)
    _check_dataset_args(num_images, seed, finding_prob, start_index)
    _check_scales(finding_prob_scale or {})
    _check_images_per_patient(images_per_patient)
    rows = {"image": [], "patient_id": [], "finding_labels": [], **{f: [] for f in FINDINGS},
            "patient_sex": [], "patient_age": [], "view_position": [], REPORT_COLUMN: []}
    images = patients_of(seed, images_per_patient, start_index, start_index + num_images)
    for patient, study in tqdm(images, desc="phantom", disable=len(images) < 1000):
        if images_per_patient == 1:
            pixels, findings, demographics, facts = draw_phantom(seed, patient, resolution, finding_prob,
                                                                 finding_prob_scale=finding_prob_scale, facts=True)
            rows["patient_id"].append(f"phantom-{seed}-{patient}")
        else:
            pixels, findings, demographics, facts = draw_study(seed, patient, study, resolution, finding_prob,
                                                               finding_prob_scale=finding_prob_scale, facts=True)
            rows["patient_id"].append(f"phantom-{seed}-p{patient}")
        rows[REPORT_COLUMN].append(phantom_report(facts, demographics.sex, demographics.age, demographics.view,
                                                  np.random.default_rng([seed, patient, study, 7])))
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").save(buffer, format="PNG", compress_level=1)
        rows["image"].append({"bytes": buffer.getvalue(), "path": None})
        rows["finding_labels"].append(findings or [NO_FINDING])
        for f in FINDINGS:
            rows[f].append(f in findings)
        rows["patient_sex"].append(demographics.sex)
        rows["patient_age"].append(demographics.age)
        rows["view_position"].append(demographics.view)
    features = datasets.Features({
        "image": datasets.Image(), "patient_id": datasets.Value("string"),
        "finding_labels": datasets.List(datasets.Value("string")), **{f: datasets.Value("bool") for f in FINDINGS},
        "patient_sex": datasets.Value("string"), "patient_age": datasets.Value("float32"),
        "view_position": datasets.Value("string"), REPORT_COLUMN: datasets.Value("string"),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def phantom_grid(path, resolution: int = 128, rows: int = 2, cols: int = 4, seed: int = 0,
                 finding_prob: float = 0.3) -> Image.Image:
    """Write a rows x cols PNG grid of phantoms (images 0.. of `seed`), marked synthetic, and return it."""
    if rows < 1 or cols < 1:
        raise UsageError(f"rows and cols must be >= 1, got rows={rows!r}, cols={cols!r}")
    _check_resolution(resolution)
    _check_dataset_args(rows * cols, seed, finding_prob, 0)
    images = [Image.fromarray(draw_phantom(seed, i, resolution, finding_prob)[0], "L") for i in range(rows * cols)]
    grid = image_grid(images, cols)
    info = synthetic_png_info("Synthetic procedural chest phantom; not a real patient; not for diagnosis.",
                              synthetic="procedural phantom")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, pnginfo=info)
    return grid


@dataclass
class GridArguments:
    grid: str = field(metadata={"help": "PNG file to write, e.g. docs/phantom_grid.png"})
    resolution: int = field(default=128, metadata={"help": f"pixels per image, {MIN_RESOLUTION}..{MAX_RESOLUTION}"})
    rows: int = 2
    cols: int = 4
    seed: int = 0
    finding_prob: float = field(default=0.3, metadata={"help": "per-finding probability, 0..1"})


def main(argv: Sequence[str] | None = None) -> None:
    (args,) = parse_args(GridArguments, argv)
    run(lambda: phantom_grid(args.grid, args.resolution, args.rows, args.cols, args.seed, args.finding_prob))
    print(f"wrote {args.grid}")


if __name__ == "__main__":
    main()
