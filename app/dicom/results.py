"""Findings as DICOM objects (highdicom), in the source study, in new series.

- A Comprehensive SR measurement report (TID 1500): per image, a measurement group with the
  fracture probability and the operating point; per detected fracture, a planar ROI group with
  the box as a closed SCOORD polyline on the source instance and its score.
- A Secondary Capture per image with the boxes burned in. Chosen over a Grayscale Softcopy
  Presentation State because every PACS viewer shows an SC image, while GSPS support (and how
  graphic layers are drawn) varies between viewers; the SC says BurnedInAnnotation YES and
  references its source image.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless, generate_uid

# The service as an SR device observer: one UID for every installation, UUID-derived (2.25.)
# from the product's name, so it needs no registered root and never changes.
DEVICE_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:fracture-service:device").int)


def new_uid(root: str | None) -> str:
    """A UID under `root` (Settings.uid_root), else UUID-derived (2.25.): never pydicom's
    example root."""
    return generate_uid(prefix=root) if root else generate_uid(prefix=None)


MANUFACTURER = "Fracture Service Project"
MODEL_NAME = "fracture-service"
SCHEME = "99FRACTURE"  # our local coding scheme for concepts no standard code covers


@dataclass
class ImageFindings:
    source: Dataset  # the source instance's header (no pixel data needed)
    pixels: np.ndarray  # the decoded grey image, for the secondary capture
    probability: float
    verdict: str  # fracture, doubt or no_fracture (app.inference.plan.Scoring.level)
    boxes: np.ndarray  # (k, 4) xyxy in source pixels
    scores: np.ndarray
    # (rows, columns) of the source frame when `pixels` is the downsampled working image
    frame_size: tuple[int, int] | None = None
    # the operating point of the boxes, as the capture says it ("0.4 FP/image")
    operating_point: str = ""
    ood_score: float | None = None  # app/inference/familiarity.py; None without a reference
    out_of_distribution: bool = False  # flagged: outside validated conditions

    @property
    def fracture(self) -> bool:
        return self.verdict == "fracture"


# How the three-level verdict reads in words (the secondary capture, the viewer).
VERDICT_WORDS = {"fracture": "fracture", "doubt": "doubtful", "no_fracture": "no fracture"}


# Type 2 attributes of the patient and study modules: present (possibly empty) in what we write.
TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def source_header(ds: Dataset) -> Dataset:
    """A copy of a source header without pixel data, its Type 2 attributes present."""
    out = Dataset()
    for element in ds:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            out.add(element)
    for keyword in TYPE2:
        if keyword not in out:
            setattr(out, keyword, "")
    out.file_meta = getattr(ds, "file_meta", Dataset())
    return out


def _codes() -> dict[str, Any]:
    from highdicom.sr import CodedConcept

    return {
        "fracture": CodedConcept("72704001", "SCT", "Fracture"),
        "procedure": CodedConcept("363680008", "SCT", "Radiographic imaging procedure"),
        "probability": CodedConcept("FRACPROB", SCHEME, "Fracture probability"),
        "box_score": CodedConcept("FRACSCORE", SCHEME, "Fracture detection score"),
        "fp_rate": CodedConcept("FPPERIMG", SCHEME, "Operating point false positives per image"),
        "threshold": CodedConcept("DETTHR", SCHEME, "Detector score threshold"),
        "decision": CodedConcept("FRACTHR", SCHEME, "Fracture probability decision threshold"),
        "rule_out": CodedConcept("FRACNOBELOW", SCHEME, "No-fracture verdict threshold"),
        "rule_in": CodedConcept("FRACFROM", SCHEME, "Fracture verdict threshold"),
        "verdict": CodedConcept("FRACVERDICT", SCHEME, "Fracture triage verdict"),
        "ood_score": CodedConcept("FRACOOD", SCHEME, "Out-of-distribution score"),
        "unfamiliar": CodedConcept("FRACOUTSIDE", SCHEME, "Outside validated conditions"),
        "present": CodedConcept("52101004", "SCT", "Present"),
        "absent": CodedConcept("2667000", "SCT", "Absent"),
        "equivocal": CodedConcept("42425007", "SCT", "Equivocal"),
        "unitless": CodedConcept("1", "UCUM", "no units"),
    }


@dataclass(frozen=True)
class Algorithms:
    """Name and version of each model that made a measurement, for its AlgorithmIdentification."""

    cropper: tuple[str, str]
    classifier: tuple[str, str]
    detector: tuple[str, str]


def build_sr(
    findings: list[ImageFindings],
    operating_point: dict[str, Any],
    algorithms: Algorithms,
    series_uid: str,
    uid_root: str | None = None,
) -> Dataset:
    """TID 1500 measurement report over every image of the study. Each measurement names the
    model that made it: the probability the classifier (the crop it saw came from the cropper,
    named in the group's algorithm parameters), each box and score the detector."""
    from highdicom.sr import ComprehensiveSR, MeasurementReport, ObservationContext

    classifier_id, detector_id = _algorithm_ids(algorithms, operating_point)
    groups: list[Any] = []
    for i, f in enumerate(findings):
        groups.append(_image_group(i, f, operating_point, classifier_id, detector_id, uid_root))
        groups += _box_groups(i, f, detector_id, uid_root)
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=_device()),
        procedure_reported=_codes()["procedure"],
        imaging_measurements=groups,
    )
    sr = ComprehensiveSR(
        evidence=[f.source for f in findings],
        content=report,
        series_instance_uid=series_uid,
        series_number=9901,
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
    )
    sr.SeriesDescription = "Fracture detection report (AI)"
    sr.ManufacturerModelName = MODEL_NAME
    sr.SoftwareVersions = [
        f"{name} {version}"
        for name, version in (algorithms.cropper, algorithms.classifier, algorithms.detector)
    ]
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "Fracture service local codes"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _algorithm_ids(algorithms: Algorithms, operating_point: dict[str, Any]) -> tuple[Any, Any]:
    """The classifier's and the detector's AlgorithmIdentification (the cropper named in both)."""
    from highdicom.sr import AlgorithmIdentification

    cropper_text = f"cropper {algorithms.cropper[0]} {algorithms.cropper[1]}"
    classifier_id = AlgorithmIdentification(
        name=algorithms.classifier[0],
        version=algorithms.classifier[1],
        parameters=[cropper_text],
    )
    detector_id = AlgorithmIdentification(
        name=algorithms.detector[0],
        version=algorithms.detector[1],
        parameters=[cropper_text, f"threshold {operating_point['detector_threshold']:.6f}"],
    )
    return classifier_id, detector_id


def _device() -> Any:
    """The service as the SR's device observer."""
    from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
    from pydicom.sr.codedict import codes

    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID,
            name=MODEL_NAME,
            manufacturer_name=MANUFACTURER,
            model_name=MODEL_NAME,
        ),
    )


def _measurement(name: str, value: float, algorithm: Any) -> Any:
    from highdicom.sr import Measurement

    c = _codes()
    return Measurement(name=c[name], value=float(value), unit=c["unitless"], algorithm_id=algorithm)


# Where each optional threshold of the operating point goes: its concept, and which model's.
THRESHOLDS = (
    ("decision_threshold", "decision", "classifier"),
    ("no_fracture_below", "rule_out", "classifier"),
    ("fracture_from", "rule_in", "classifier"),
    ("fp_per_image", "fp_rate", "detector"),
)
TRIAGE = {"fracture": "present", "doubt": "equivocal", "no_fracture": "absent"}


def _image_group(
    i: int,
    f: ImageFindings,
    operating_point: dict[str, Any],
    classifier_id: Any,
    detector_id: Any,
    uid_root: str | None,
) -> Any:
    """One image's measurement group: the probability, the thresholds it was judged by (those
    the request had: a score_threshold has no fp_per_image), the verdict of every image
    (Fracture = Present / Absent, and the three-level triage verdict: Present, Equivocal,
    Absent), and where there is a reference the ood_score and whether it is flagged."""
    from highdicom.sr import (
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    c = _codes()
    by_role = {"classifier": classifier_id, "detector": detector_id}
    measurements = [
        _measurement("probability", f.probability, classifier_id),
        _measurement("threshold", operating_point["detector_threshold"], detector_id),
    ]
    for key, concept, role in THRESHOLDS:
        if operating_point.get(key) is not None:
            measurements.append(_measurement(concept, operating_point[key], by_role[role]))
    evaluations = [
        QualitativeEvaluation(name=c["fracture"], value=c["present" if f.fracture else "absent"]),
        QualitativeEvaluation(name=c["verdict"], value=c[TRIAGE[f.verdict]]),
    ]
    if f.ood_score is not None:
        measurements.append(_measurement("ood_score", f.ood_score, classifier_id))
        flagged = "present" if f.out_of_distribution else "absent"
        evaluations.append(QualitativeEvaluation(name=c["unfamiliar"], value=c[flagged]))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=new_uid(uid_root), identifier=f"image {i + 1}"),
        finding_type=c["fracture"],
        algorithm_id=classifier_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup.from_source_image(f.source)],
    )


def _box_groups(i: int, f: ImageFindings, detector_id: Any, uid_root: str | None) -> list[Any]:
    """A planar ROI group per detected fracture: the box as a closed polyline on the source
    image (clipped to it) and its score."""
    from highdicom.sr import (
        GraphicTypeValues,
        ImageRegion,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )

    rows, cols = int(f.source.Rows), int(f.source.Columns)
    groups = []
    for j, (box, score) in enumerate(zip(f.boxes, f.scores, strict=True)):
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = np.clip([x1, x2], 0, cols)
        y1, y2 = np.clip([y1, y2], 0, rows)
        polyline = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=new_uid(uid_root), identifier=f"image {i + 1} fracture {j + 1}"
                ),
                referenced_region=ImageRegion(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=polyline,
                    source_image=SourceImageForRegion.from_source_image(f.source),
                ),
                finding_type=_codes()["fracture"],
                algorithm_id=detector_id,
                measurements=[_measurement("box_score", score, detector_id)],
            )
        )
    return groups


def build_secondary_capture(
    finding: ImageFindings, series_uid: str, instance_number: int, uid_root: str | None = None
) -> Dataset:
    """The source image (grey stretched to 8 bits) with the boxes and scores burned in."""
    from highdicom.sc import SCImage

    from app.inference.preprocessing import stretch_grey

    grey = Image.fromarray((stretch_grey(finding.pixels) * 255).astype(np.uint8))
    if finding.frame_size is not None:  # the capture has the source's geometry
        grey = grey.resize(finding.frame_size[::-1], Image.BILINEAR)
    canvas = grey.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    width = max(2, round(min(h, w) / 300))
    # Text readable when the image is fitted to a screen: about 1/40 of the short side.
    font = ImageFont.load_default(size=max(12, round(min(h, w) / 40)))
    colour, shadow = (255, 210, 0), (0, 0, 0)
    for box, score in zip(finding.boxes, finding.scores, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"fracture {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        # Just above the box, or just below it when the box touches the top edge.
        ty = y1 - (bottom - top) - 2 * width if y1 - (bottom - top) - 2 * width >= 0 else y2 + width
        tx = min(max(0.0, x1), max(0.0, w - (right - left)))
        draw.text((tx, ty - top), text, fill=colour, font=font, stroke_width=1, stroke_fill=shadow)
    lines = [
        f"AI: {VERDICT_WORDS[finding.verdict]} (fracture probability {finding.probability:.2f})",
        f"boxes at {finding.operating_point}" if finding.operating_point else "",
        "OUTSIDE VALIDATED CONDITIONS" if finding.out_of_distribution else "",
        "not for primary diagnosis",
    ]
    margin = max(4, round(min(h, w) / 100))
    draw.multiline_text(
        (margin, margin),
        "\n".join(line for line in lines if line),
        fill=colour,
        font=font,
        stroke_width=1,
        stroke_fill=shadow,
    )
    # Orientation copied from the source when it has one; otherwise none is claimed.
    orientation = finding.source.get("PatientOrientation")
    known = bool(orientation) and len(orientation) == 2
    sc = SCImage.from_ref_dataset(
        ref_dataset=finding.source,
        pixel_array=np.asarray(canvas),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=9902,
        sop_instance_uid=new_uid(uid_root),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom insists on a value; an unknown one is emptied below (Type 2: may be empty)
        patient_orientation=tuple(orientation) if known else ("L", "F"),
        # lossless and about half the size of the raw RGB frame (9.3 -> 4.2 MB on a DX)
        transfer_syntax_uid=RLELossless,
    )
    if not known:
        sc.PatientOrientation = None
    # General Series, Type 2C: the source's side of a paired body part, else present and empty
    sc.Laterality = finding.source.get("Laterality", None) or None
    sc.SeriesDescription = "Fracture detections (AI, burned in)"
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = MODEL_NAME
    source_ref = Dataset()
    source_ref.ReferencedSOPClassUID = finding.source.SOPClassUID
    source_ref.ReferencedSOPInstanceUID = finding.source.SOPInstanceUID
    sc.SourceImageSequence = [source_ref]
    return sc


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
