"""DICOM stand-ins written with pydicom by the tests themselves (no binary fixtures): a DX chest radiograph with the
header fields a reader must handle, and the objects it must skip."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def gradient(rows=40, cols=48, high=4095, seed=0):
    """A 12-bit image with every grey level region a pipeline step could move, plus a little texture."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, high, rows * cols).reshape(rows, cols)
    return np.clip(ramp + rng.integers(-20, 21, (rows, cols)), 0, high).astype(np.uint16)


def dataset(pixels=None, photometric="MONOCHROME2", bits_stored=12, sop_class=DX_STORAGE, **header) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    return ds


def voi_lut(first_mapped: int, bits: int, table) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [len(table), first_mapped, bits]
    item.LUTData = [int(v) for v in table]
    return Sequence([item])


def write(ds: Dataset, path: Path, transfer_syntax=None) -> Path:
    if transfer_syntax is not None:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def chest(path: Path, patient="P-001", sex="F", age="045Y", view="PA", seed=0, **header) -> Path:
    return write(dataset(gradient(seed=seed), PatientID=patient, PatientSex=sex, PatientAge=age, ViewPosition=view,
                         **header), path)


def structured_report(path: Path) -> Path:
    return write(dataset(sop_class=BASIC_TEXT_SR, PatientID="P-001"), path)
