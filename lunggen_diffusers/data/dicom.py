"""DICOM chest radiographs: grey levels as the standard defines them, and the few header fields the project keeps.

The grey pipeline, in the standard's order (PS3.3 C.11.1, C.11.2, C.7.6.3.1.2):
    stored values
    -> modality LUT: a Modality LUT Sequence, else Rescale Slope / Intercept (pydicom's `apply_modality_lut`)
    -> VOI: a VOI LUT Sequence (its first LUT, pydicom's `apply_voi`) wins over Window Center / Width (the first
       window; VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID by the standard's formulas, straight to [0, 1]);
       with no VOI at all, the image's own range (min..max), or the `percentiles` given
    -> MONOCHROME1 inverted, so bone is white as in MONOCHROME2
    -> 8-bit grayscale (mode L) for the decode pass every source goes through.

Headers carry names, birth dates, institutions, accession numbers: only KEPT_COLUMNS leave this module, with the
patient pseudonymised (`patient_key`: HMAC under a key kept locally, `pseudonym_key`), and a skipped file is listed
by its path and a reason, never a header value.
Compressed transfer syntaxes decode through pydicom's plugins: pylibjpeg-libjpeg (JPEG baseline, extended,
lossless, JPEG-LS), pylibjpeg-openjpeg (JPEG 2000) and pylibjpeg-rle (RLE; pydicom's own RLE decoder otherwise).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

import numpy as np
from PIL import Image

from ..cli import UsageError
from ..utils import is_dicom, list_images

KEPT_COLUMNS = ("patient_id", "patient_age", "patient_sex", "view_position")
KEY_FILE, MIN_KEY_BYTES = "pseudonym.key", 16
# Identifying attributes of PS3.15's Basic Application Level Confidentiality Profile that chest radiographs carry.
# Their values are never stored; their digests are (`phi_digests.json`, local), so that every text the project
# publishes is checked for them (hub/privacy.py).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator", "MilitaryRank",
    "EthnicGroup", "Occupation", "AdditionalPatientHistory", "PatientComments", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName", "ReferringPhysicianAddress",
    "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy",
    "RequestingPhysician", "AccessionNumber", "StudyID", "StationName", "DeviceSerialNumber", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID", "StudyDate", "SeriesDate", "AcquisitionDate",
    "ContentDate", "StudyTime", "AcquisitionDateTime", "RequestedProcedureID", "PerformedProcedureStepID",
    "ImageComments",
)
MIN_PHI_LENGTH = 6  # shorter values (initials, "M", "2") would be found in any text by chance
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")
# Whole words of a Series Description / Protocol Name that name a view; used only when exactly one view is named.
_VIEW_WORDS = {"PA": "PA", "AP": "AP", "LAT": "LL", "LATERAL": "LL", "LL": "LL"}


class SkippedFile(ValueError):
    """A file that is no usable chest radiograph; its message is the reason, with no header value in it."""


def _read(path, **kwargs):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, **kwargs)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise SkippedFile(f"unreadable ({type(err).__name__})") from None


def check_image(ds) -> None:
    """Refuse what is not a single grey radiograph: no pixel data (structured reports, presentation states),
    several frames, colour."""
    if "PixelData" not in ds:
        raise SkippedFile(f"no pixel data ({getattr(ds.get('SOPClassUID'), 'name', 'no SOP class')})")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise SkippedFile(f"multi-frame ({frames} frames)")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in MONOCHROME or int(ds.get("SamplesPerPixel") or 1) != 1:
        raise SkippedFile(f"colour or not grayscale (PhotometricInterpretation {photometric or 'missing'})")


def default_key_file() -> Path:
    """This installation's own pseudonym key: $XDG_CONFIG_HOME (or ~/.config)/lunggen_diffusers/pseudonym.key."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "lunggen_diffusers" / KEY_FILE


def pseudonym_key(path: str | Path | None = None) -> bytes:
    """The secret DICOM pseudonyms are keyed with: the file `path` (a key a team shares, so every machine makes the
    same pseudonyms and the same split), else this installation's own, made on first use (32 random bytes, readable
    by its owner only). Without a key, a short Patient ID could be found again by hashing every possible value."""
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise UsageError(f"--pseudonym_key {path}: no such file (make one with python -c \"import secrets; "
                             f"open('team.key', 'wb').write(secrets.token_bytes(32))\")")
        key = found.read_bytes()
        if len(key) < MIN_KEY_BYTES:
            raise UsageError(f"--pseudonym_key {path}: {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} random "
                             "bytes")
        return key
    own = default_key_file()
    if not own.is_file():
        own.parent.mkdir(parents=True, exist_ok=True)
        temporary = own.with_name(f".{own.name}.{os.getpid()}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(temporary, own)  # atomic, and never over a key another process made first
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return own.read_bytes()


def key_id(key: bytes) -> str:
    """Which key made a set of pseudonyms, for records and cache keys: not the key, and no way back to it."""
    return hashlib.sha256(b"lunggen-diffusers pseudonym key id|" + key).hexdigest()[:12]


def patient_key(patient_id: str, key: bytes) -> str:
    """A stable pseudonym of a DICOM Patient ID: HMAC-SHA256 under `key`, so the same patient gets the same pseudonym
    (splits stay patient-wise) and no one without the key can test a guessed ID against it (the ID itself is never
    stored)."""
    return "dicom-" + hmac.new(key, f"dicom patient|{patient_id}".encode(), hashlib.sha256).hexdigest()[:16]


def _age(ds) -> float | None:
    """Patient's Age ("045Y", "006M", "010W", "003D") in years, else from birth and study dates; None if neither."""
    found = re.fullmatch(r"(\d{1,3})([YMWD])", str(ds.get("PatientAge", "")).strip().upper())
    if found:
        return round(int(found.group(1)) / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[found.group(2)], 2)
    try:
        born = datetime.datetime.strptime(str(ds.get("PatientBirthDate", "")), "%Y%m%d")
        seen = datetime.datetime.strptime(str(ds.get("StudyDate", "")), "%Y%m%d")
    except ValueError:
        return None
    return round((seen - born).days / 365.25, 2) if seen >= born else None


def _view(ds) -> str:
    view = str(ds.get("ViewPosition", "")).strip().upper()
    if view:
        return view
    words = set(re.findall(r"[A-Z]+", " ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "ProtocolName"))
                                                                                                          .upper()))
    named = {_VIEW_WORDS[w] for w in words if w in _VIEW_WORDS}
    return named.pop() if len(named) == 1 else ""


def phi_values(ds) -> set[str]:
    """The identifying values of a header (PHI_KEYWORDS, and every person's name, in sequences too; a name also by
    its parts), upper-cased, at least MIN_PHI_LENGTH long: what `phi_digests.json` holds the digests of."""
    found = set()
    values = [ds.get(keyword) for keyword in PHI_KEYWORDS]
    values += [element.value for element in ds.iterall() if element.VR == "PN"]
    for value in values:
        if value is None:
            continue
        for item in (value if type(value).__name__ == "MultiValue" else [value]):
            text = str(item).strip()
            found.add(text)
            found.update(part.strip() for part in re.split(r"[\^=]", text))
            found.add(" ".join(p for p in text.split("^") if p))
    return {v.upper() for v in found if len(v) >= MIN_PHI_LENGTH}


def read_header(path: str | Path, key: bytes, phi: set[str] | None = None) -> dict:
    """The kept columns of one DICOM file (the pixel data is not read), the patient pseudonymised under `key`;
    SkippedFile if it is no usable image. `phi`, when given, collects the file's identifying values (`phi_values`)."""
    ds = _read(path, defer_size="1 KB")
    if phi is not None:
        phi.update(phi_values(ds))
    check_image(ds)
    patient = str(ds.get("PatientID", "")).strip()
    sex = str(ds.get("PatientSex", "")).strip().upper()
    return {"patient_id": patient_key(patient, key) if patient else "", "patient_age": _age(ds),
            "patient_sex": sex if sex in ("M", "F", "O") else "", "view_position": _view(ds)}


def _first(value) -> float:
    return float(value[0] if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else value)


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 and C.11.2.1.3, mapped to [0, 1]."""
    function = function.upper()
    if function not in VOI_FUNCTIONS:
        raise SkippedFile(f"unknown VOI LUT Function {function!r} (known: {', '.join(VOI_FUNCTIONS)})")
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise SkippedFile(f"Window Width {width} < 1 with VOI LUT Function LINEAR")
    if width == 1:  # a threshold at the centre
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def grey_levels(ds, percentiles: tuple[float, float] | None = None) -> np.ndarray:
    """A dataset's pixels through the grey pipeline: float64 (H, W) in [0, 1], bone white."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    check_image(ds)
    try:
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    except Exception as err:  # a truncated or undecodable pixel stream: its decoder's own error type
        raise SkippedFile(f"pixel data not decodable ({type(err).__name__}: {str(err)[:80]})") from None
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        # The LUT is indexed by the modality output, an integer wherever a VOI LUT is used: round, don't truncate.
        grey = apply_voi(np.round(values).astype(np.int64), ds, index=0).astype(np.float64) / (2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        grey = window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        lo, hi = np.percentile(values, percentiles) if percentiles else (values.min(), values.max())
        grey = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    grey = np.clip(grey, 0.0, 1.0)
    return 1.0 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def read_image(path: str | Path, percentiles: tuple[float, float] | None = None) -> Image.Image:
    """One DICOM file as an 8-bit grayscale PIL image (the grey pipeline); SkippedFile if it is not usable."""
    return Image.fromarray(np.round(grey_levels(_read(path), percentiles) * 255).astype(np.uint8), "L")


def dicom_folder(root: str | Path, key: bytes, phi: set[str] | None = None
                 ) -> tuple[list[str], dict[str, list], list[tuple[str, str]]]:
    """Every DICOM file below `root` that is a usable radiograph: (paths, kept columns with patients pseudonymised
    under `key`, skipped). `skipped` holds (path relative to `root`, reason) for each file left out; `phi` collects
    every file's identifying values. A
    folder that mixes DICOM with other images is refused: its non-DICOM images would carry no patient, and the
    split could not be patient-wise."""
    root = Path(root)
    files = list_images(root)
    others = [p for p in files if not is_dicom(p)]
    if others:
        raise UsageError(f"{root} mixes DICOM files with {len(others)} other image(s) (first: "
                         f"{others[0].relative_to(root)}); give a folder of one kind")
    paths, columns, skipped = [], {name: [] for name in KEPT_COLUMNS}, []
    for path in files:
        try:
            header = read_header(path, key, phi)
        except SkippedFile as why:
            skipped.append((str(path.relative_to(root)), str(why)))
            continue
        paths.append(str(path))
        for name in KEPT_COLUMNS:
            columns[name].append(header[name])
    return paths, columns, skipped
