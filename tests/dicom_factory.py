"""DICOM files written by the tests themselves with pydicom (no shared data needed)."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

PATIENT = {
    "PatientName": "Testperson^Secretname",
    "PatientID": "PID-7731-SECRET",
    "PatientBirthDate": "19230405",
    "AccessionNumber": "ACC-99812-SECRET",
}


def make_dataset(
    pixels: np.ndarray,
    *,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    frames: int = 1,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    study_uid: str | None = None,
) -> Dataset:
    """A single- or multi-frame grey DX dataset around uint16 pixels (frames stacked on axis 0)."""
    arr = np.ascontiguousarray(pixels, dtype=np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "HAND"
    for key, value in PATIENT.items():
        setattr(ds, key, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [0.15, 0.15]
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = arr.tobytes()
    return ds


def to_bytes(ds: Dataset, *, with_meta: bool = True) -> bytes:
    if with_meta:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return buf.getvalue()
    # Old-style raw dataset: no preamble, no file meta, implicit VR little endian.
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = True
    clean = Dataset()
    clean.update({el.tag: el for el in ds})
    write_dataset(fp, clean)
    assert ds.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    return fp.getvalue()
