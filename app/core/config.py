"""The service's settings: one class, read from the environment (prefix FRACTURE_)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
# The operating point when a request gives none: one of the FROC rows every detector card carries
# (app.inference.model_card.FP_RATES), the one Xie et al. chose.
DEFAULT_FP_PER_IMAGE = 0.4
# DICOM modalities that are projection radiographs: what the service accepts by default and what
# training and the tools decode FracAtlas with.
RADIOGRAPH_MODALITIES = ("CR", "DX", "RG")
# DICOM BodyPartExamined values (PS3.16 CID 4031 terms and common variants) of the limbs and the
# pelvis, the regions the models were made for; any other named region is refused.
LIMB_BODY_PARTS = (
    "ANKLE", "ARM", "CALCANEUS", "CLAVICLE", "ELBOW", "EXTREMITY", "FEMUR", "FIBULA", "FINGER",
    "FOOT", "FOREARM", "HAND", "HEEL", "HIP", "HUMERUS", "KNEE", "LEG", "LOWER LIMB",
    "LOWER EXTREMITY", "LOWERLIMB", "PATELLA", "PELVIS", "RADIUS", "SCAPULA", "SHOULDER",
    "THIGH", "THUMB", "TIBIA", "TOE", "ULNA", "UPPER ARM", "UPPER EXTREMITY", "UPPER LIMB",
    "UPPERLIMB", "WRIST",
)  # fmt: skip


@dataclass(frozen=True)
class PipelineOptions:
    """The optional stages of the served pipeline (app/inference/pipeline.py), decided once from
    Settings: `upright` turns a tilted radiograph onto its nearest axis, `markers` paints burned-in
    annotations out, `polarity` inverts a PNG or JPEG shown bone-dark, `orient` runs the models
    folder's orienter on every crop."""

    upright: bool = False
    markers: bool = False
    polarity: bool = False
    orient: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FRACTURE_", env_file=None)

    models_dir: Path = Field(REPO_MODELS, description="folder of ONNX models and their JSON cards")
    default_classifier: str = Field(
        "classifier-mobilenetv2", description="classifier used when a request names none"
    )
    default_detector: str = Field(
        "detector-frcnn-mobilenetv2-robust", description="detector used when a request names none"
    )
    execution_provider: Literal["auto", "tensorrt", "cuda", "cpu"] = Field(
        "auto", description="auto: TensorRT, then CUDA, then CPU, whichever onnxruntime offers"
    )
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime intra-op threads (0: its default)"
    )
    intra_op_spinning: bool = Field(
        False,
        description="onnxruntime pool threads spin between runs: off, as they would take the "
        "cores from the decode and resize work between the models",
    )
    inference_workers: int = Field(
        2, ge=1, description="requests whose models run at the same time"
    )
    batch_max_images: int | None = Field(
        None,
        ge=1,
        description="most images one model call carries when studies of concurrent requests "
        "are batched together (1: no batching across requests; default: 8 on a GPU, 1 on the "
        "CPU, where batching was measured not to help)",
    )
    batch_max_delay_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="how long a batch may wait for more studies (0: only those already waiting)",
    )
    max_queue: int | None = Field(
        None,
        ge=0,
        description="requests that may wait for a model slot beyond those running; past it 503 "
        "with Retry-After (default: 4 per inference worker)",
    )
    max_intake_instances: int = Field(
        2000,
        ge=1,
        description="DICOM instances accepted (STOW-RS, C-STORE) and kept until analysed; past "
        "it new ones are answered out of resources (C-STORE 0xA700, STOW-RS 503 Retry-After)",
    )
    body_read_timeout_s: float = Field(
        15.0, gt=0, description="longest wait for the next piece of a request body (408 after)"
    )
    max_body_bytes: int = Field(
        128 * 1024 * 1024, ge=1024, description="largest request body (413 above)"
    )
    max_image_pixels: int = Field(
        60_000_000, ge=1, description="largest image in pixels (413 above)"
    )
    max_images_per_request: int = Field(
        32, ge=1, description="most images in one study request (413 above)"
    )
    site_calibration: Path | None = Field(
        None,
        description="a site's operating points and calibration over the shipped cards, written by "
        "`python -m training calibrate --folder ...` (README: site calibration)",
    )
    default_fp_per_image: float = Field(
        DEFAULT_FP_PER_IMAGE, description="operating point when a request gives none"
    )
    upright: bool = Field(
        True,
        description="turn a radiograph whose bone axis lies between quarter turns onto the nearest "
        "axis before the models see it (app/inference/upright.py); boxes come back in the frame "
        "as sent. The shipped cards' calibration and operating points were fitted with it on",
    )
    orient: bool = Field(
        False,
        description="turn a crop that the orienter model finds a quarter or half turn from the "
        "way FracAtlas shows limbs (proximal end up) before the classifier and detector see it; "
        "needs an orienter card in models_dir. Boxes come back in the frame as sent",
    )
    fix_polarity: bool = Field(
        True,
        description="invert a PNG or JPEG whose bone is dark on a bright background (an image "
        "exported from MONOCHROME1 without its presentation step) before the models see it "
        "(app/inference/polarity.py); DICOM keeps the polarity its header declares",
    )
    paint_out_markers: bool = Field(
        False,
        description="paint burned-in annotations (side markers, acquisition text, label tabs) "
        "out of what the models see (app/inference/markers.py); the answer refers to the image "
        "as sent",
    )
    allowed_modalities: list[str] = Field(
        default_factory=lambda: list(RADIOGRAPH_MODALITIES),
        description="DICOM modalities accepted as musculoskeletal radiographs (others: 422)",
    )
    allowed_body_parts: list[str] = Field(
        default_factory=lambda: list(LIMB_BODY_PARTS),
        description="DICOM BodyPartExamined (or anatomic region) values analysed; an image naming "
        "another region is refused (422 out_of_scope), one naming none is analysed",
    )
    log_level: str = Field("INFO", description="Python log level")
    log_json: bool = Field(True, description="one JSON object per log line (false: plain text)")
    oidc_issuer: str | None = Field(
        None,
        description="the hospital identity provider's issuer: bearer JWTs it signed are accepted "
        "beside the API keys (its `iss`)",
    )
    oidc_audience: str = Field(
        "fracture-service", description="the `aud` a token must carry for this service"
    )
    oidc_jwks_url: str | None = Field(
        None, description="where its signing keys are (default: the issuer's discovery document)"
    )
    oidc_jwks_ttl_s: float = Field(600.0, gt=0, description="how long its keys are cached")
    api_keys: list[str] = Field(
        default_factory=list,
        description="JSON list of API keys; when set, every endpoint but the probes needs "
        "`Authorization: Bearer <key>`",
        repr=False,
    )
    metrics_public: bool = Field(False, description="serve /metrics without a key")
    dimse_host: str | None = Field(
        None, description="address the C-STORE receiver binds (default: HOST, else 127.0.0.1)"
    )
    dimse_calling_ae_titles: list[str] = Field(
        default_factory=list,
        description="JSON list of calling AE titles allowed to send (empty: any)",
    )
    uid_root: str | None = Field(
        None,
        pattern=r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.$",
        max_length=40,
        description="UID root of the DICOM objects the service writes (an OID registered to the "
        "site or vendor, ending in '.'); unset: UUID-derived 2.25. UIDs, unique without one",
    )
    public_url: str | None = Field(
        None,
        description="the service's external base URL (e.g. https://fracture.example.org) for "
        "RetrieveURL and results links; unset: links are paths on this host, RetrieveURL the "
        "address the connection came in on",
    )
    dicomweb_destination: str | None = Field(
        None,
        description="DICOMweb base URL that receives our SR and SC objects (STOW-RS), e.g. http://pacs:8042/dicom-web",
    )
    dicomweb_destination_token: str | None = Field(
        None, description="bearer token for the destination", repr=False
    )
    dicomweb_destination_username: str | None = Field(
        None, description="basic-auth user for the destination"
    )
    dicomweb_destination_password: str | None = Field(
        None, description="basic-auth password for the destination", repr=False
    )
    dimse_destination: str | None = Field(
        None,
        pattern=r"^[^@]{1,16}@[^:]+:[0-9]{1,5}$",
        description="results pushed over DIMSE C-STORE to AET@host:port (a PACS without "
        "DICOMweb; our calling AE title is FRACTURE_DIMSE_AE_TITLE); used when "
        "FRACTURE_DICOMWEB_DESTINATION is unset",
    )
    delivery_retry_s: float = Field(
        5.0, gt=0, description="first retry delay of a failed delivery (doubles)"
    )
    delivery_max_backoff_s: float = Field(
        300.0, gt=0, description="longest delay between delivery attempts"
    )
    delivery_timeout_s: float = Field(
        30.0, gt=0, description="timeout of one STOW-RS request to the destination"
    )
    dimse_port: int | None = Field(
        None, ge=1, le=65535, description="port of the DICOM C-STORE receiver (off when unset)"
    )
    dimse_ae_title: str = Field(
        "FRACTURE", max_length=16, description="AE title of the C-STORE receiver"
    )
    state_dir: Path = Field(
        Path("state"),
        description="folder of the SQLite database of results and their delivery (created)",
    )
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the results database instead (PostgreSQL: "
        "postgresql+psycopg://user:password@host/db), shared by replicas",
        repr=False,
    )
    result_retention_s: float = Field(
        86_400.0, gt=0, description="how long results stay retrievable here, delivered or not"
    )

    @property
    def queue_limit(self) -> int:
        return 4 * self.inference_workers if self.max_queue is None else self.max_queue

    def pipeline_options(self) -> PipelineOptions:
        """The optional stages these settings switch on: the service, evaluate, calibration and
        the benchmark all run the pipeline with this one record."""
        return PipelineOptions(
            upright=self.upright,
            markers=self.paint_out_markers,
            polarity=self.fix_polarity,
            orient=self.orient,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
