"""Models at run time: cards read from models/, one onnxruntime session per model.

Each OnnxModel owns exactly one session and runs stacked batches (N x C x H x W), so a
micro-batcher can later sit in front of `run` without changing the pipeline. Sessions are
thread-safe for concurrent `run` calls.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.familiarity import FeatureReference, RadiographProbe
from app.inference.model_card import (
    REQUIRED_ROLES,
    CardError,
    DetectorOutput,
    Familiarity,
    InputSpec,
    ModelCard,
    read_card,
    read_site_calibration,
)
from app.inference.site_head import SiteHead

log = logging.getLogger("app.inference.runtime")
# Rows per CPU model call (OnnxModel.run). Measured in one process, default models, 8 FracAtlas
# JPEGs as one study: RSS 2,784 MiB unchunked, 1,188 at 4 rows, 700 at 1 row (a single image
# leaves 707 either way); per image about 4% slower at 1 row than at 4, within noise.
CPU_CHUNK = 1


class ModelLoadError(RuntimeError):
    """A shipped model cannot be served (missing file, wrong sha256, failed warm-up)."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def choose_providers(preference: str) -> list[str]:
    """Execution providers in order: TensorRT, CUDA, CPU, as far as onnxruntime offers them."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    order = {
        "auto": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
        "cuda": ["CUDAExecutionProvider"],
        "cpu": [],
    }[preference]
    return [p for p in order if p in available] + ["CPUExecutionProvider"]


@dataclass
class OnnxModel:
    """One ONNX graph and its session. Shipped models come from their card (`from_card`);
    training evaluates a graph before its card exists with the input spec and, for a detector,
    the output decoding alone (`unshipped`)."""

    path: Path
    input: InputSpec
    detector_output: DetectorOutput | None = None
    card: ModelCard | None = None
    session: Any = None
    provider: str = "CPUExecutionProvider"
    input_name: str = "input"
    output_names: list[str] = field(default_factory=list)
    # a classifier's pooled-feature output (the card's familiarity names it; fitting one sets
    # it) and the reference its out-of-distribution score is measured against
    feature_output: str | None = None
    reference: FeatureReference | None = None
    # the linear probe that tells grey non-radiographs (pages, windows, photographs) apart
    probe: RadiographProbe | None = None
    site_head: SiteHead | None = None  # a site's last layer (card site_adaptation)

    @classmethod
    def from_card(cls, card: ModelCard, models_dir: Path) -> OnnxModel:
        output = card.detector_output if card.task == "detection" else None
        return cls(models_dir / card.file, card.input, output, card)

    @classmethod
    def unshipped(
        cls, path: Path, spec: InputSpec, output: dict[str, Any] | None = None
    ) -> OnnxModel:
        decoder = DetectorOutput.model_validate(output) if output is not None else None
        return cls(path, spec, decoder)

    @property
    def name(self) -> str:
        return self.card.name if self.card else self.path.stem

    @property
    def version(self) -> str:
        return self.card.version if self.card else "unshipped"

    @property
    def role(self) -> str:
        if self.card:
            return self.card.role
        return "detector" if self.detector_output else "model"

    @property
    def spec(self) -> InputSpec:
        """How a crop becomes this model's input (the card's `input`)."""
        return self.input

    @property
    def batched(self) -> bool:
        """False for graphs that take one CHW image (torchvision detection exports)."""
        return self.input.batch

    def load(self, providers: list[str], intra_op_threads: int, spinning: bool = False) -> None:
        import onnxruntime as ort

        if not self.path.is_file():
            raise ModelLoadError(f"{self.name}: file {self.path.name} is missing")
        actual = sha256_of(self.path)
        if self.card is not None and actual != self.card.sha256:
            raise ModelLoadError(
                f"{self.name}: sha256 {actual[:12]} does not match its card ({self.card.sha256[:12]})"
            )
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning pool threads wait for work that, between two models, never comes: they take
        # the cores from the numpy work of the other stages (2x slower models, measured).
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own types for a corrupt graph
            raise ModelLoadError(
                f"{self.name}: {self.path.name} is not a loadable ONNX graph ({type(exc).__name__})"
            ) from None
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.card is not None and self.card.familiarity is not None:
            self.feature_output = self.card.familiarity.feature_output
            if self.feature_output not in self.output_names:
                raise ModelLoadError(
                    f"{self.name}: {self.path.name} has no output {self.feature_output!r} "
                    "(the features its card's familiarity names)"
                )
            self.reference = _reference(self.path.parent, self.card.familiarity, self.name)
            self.probe = _probe(self.path.parent, self.card.familiarity, self.name)
        adaptation = self.card.site_adaptation if self.card else None
        if adaptation is not None and adaptation.file:
            if self.features_at is None:
                raise ModelLoadError(f"{self.name}: a site head needs the card's familiarity")
            path = self.path.parent / adaptation.file
            if not path.is_file() or sha256_of(path) != adaptation.sha256:
                raise ModelLoadError(f"{self.name}: site head {adaptation.file} missing or altered")
            self.site_head = SiteHead.load(path)

    @property
    def features_at(self) -> int | None:
        """Index of the pooled features among the session's outputs (None: not exposed)."""
        if self.feature_output is None or self.feature_output not in self.output_names:
            return None
        return self.output_names.index(self.feature_output)

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Outputs for a stacked batch; unbatched graphs are looped, outputs kept per image.
        On the CPU a batch runs CPU_CHUNK rows at a time: onnxruntime's CPU arena keeps the
        largest buffers it ever allocated, so one 8-image study's 32 classifier views once
        held 2.2 GB for good; one row at a time keeps memory at a single image's (the cores
        are busy either way; GPUs keep their batches)."""
        if not self.batched:
            return [self.session.run(None, {self.input_name: x}) for x in batch]
        if self.provider != "CPUExecutionProvider" or len(batch) <= CPU_CHUNK:
            return self.session.run(None, {self.input_name: batch})
        parts = [
            self.session.run(None, {self.input_name: batch[i : i + CPU_CHUNK]})
            for i in range(0, len(batch), CPU_CHUNK)
        ]
        return [np.concatenate(outputs) for outputs in zip(*parts, strict=True)]

    def warm_up(self) -> None:
        h, w = self.spec.size
        dummy = np.zeros((1, self.spec.channels, h, w), dtype=np.float32)
        self.run(dummy)

    def describe(self) -> dict[str, Any]:
        return {
            **(self.card.as_json() if self.card else {}),
            "execution_provider": self.provider,
            "loaded": self.session is not None,
        }


def _reference(folder: Path, familiarity: Familiarity, name: str) -> FeatureReference:
    path = folder / familiarity.file
    if not path.is_file():
        raise ModelLoadError(f"{name}: familiarity reference {familiarity.file} is missing")
    if sha256_of(path) != familiarity.sha256:
        raise ModelLoadError(f"{name}: {familiarity.file} does not match its card's sha256")
    return FeatureReference.load(path)


def _probe(folder: Path, familiarity: Familiarity, name: str) -> RadiographProbe | None:
    """The reference file's radiograph probe, required where the card refuses by it."""
    if familiarity.probe_refuse_above is None:
        return None
    probe = RadiographProbe.load(folder / familiarity.file)
    if probe is None:
        raise ModelLoadError(
            f"{name}: its card refuses by a radiograph probe that {familiarity.file} lacks"
        )
    return probe


class ModelRegistry:
    """Every model card in a folder, by role and name. Each *.json there must be a valid card
    (ModelLoadError naming the file otherwise), and names must be unique."""

    def __init__(self, models_dir: Path, site_calibration: Path | None = None):
        self.models_dir = models_dir
        self.models: dict[str, OnnxModel] = {}
        try:
            site = read_site_calibration(site_calibration) if site_calibration else None
        except CardError as exc:
            raise ModelLoadError(str(exc)) from None
        for card_path in sorted(models_dir.glob("*.json")):
            try:
                card = read_card(card_path)
                card = site.overlay(card) if site else card
            except CardError as exc:
                raise ModelLoadError(str(exc)) from None
            if card.name in self.models:
                other = self.models[card.name].path.with_suffix(".json").name
                raise ModelLoadError(
                    f"model cards {other} and {card_path.name} both name {card.name!r}"
                )
            self.models[card.name] = OnnxModel.from_card(card, models_dir)

    def by_role(self, role: str) -> dict[str, OnnxModel]:
        return {n: m for n, m in self.models.items() if m.role == role}

    def get(self, role: str, name: str | None, default: str) -> OnnxModel:
        """The model of `role` called `name` (or the default; or the only one there is)."""
        candidates = self.by_role(role)
        if name is not None:
            if name not in candidates:
                raise KeyError(name)
            return candidates[name]
        if default in candidates:
            return candidates[default]
        if len(candidates) == 1:
            return next(iter(candidates.values()))
        raise ModelLoadError(f"no default {role}: set FRACTURE_DEFAULT_{role.upper()}")

    def orienter(self, enabled: bool) -> OnnxModel | None:
        """The orienter the pipeline runs when `enabled` (FRACTURE_ORIENT): the folder's one;
        ModelLoadError when it holds none or several. None when not enabled."""
        if not enabled:
            return None
        found = list(self.by_role("orienter").values())
        if len(found) != 1:
            raise ModelLoadError(
                f"FRACTURE_ORIENT is on: {self.models_dir} must hold one orienter model, "
                f"holds {len(found)}"
            )
        return found[0]

    def load_all(
        self, provider_preference: str, intra_op_threads: int, spinning: bool = False
    ) -> None:
        providers = choose_providers(provider_preference)
        for role in REQUIRED_ROLES:
            if not self.by_role(role):
                raise ModelLoadError(f"no {role} model in {self.models_dir}")
        for model in self.models.values():
            model.load(providers, intra_op_threads, spinning)
            model.warm_up()
            log.info("loaded %s %s on %s", model.name, model.version, model.provider)
