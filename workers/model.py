"""The model interface every method implements, plus saving and loading through store.artifacts.

A method turns a normalised image batch into an embedding (`embed`) and an embedding into image scores
and an optional patch-grid map (`score_embeddings`). PatchCore needs a k-NN index for the second step;
the single-process scorer passes a local `ShardedIndex`, the distributed scorer a proxy that asks the
index-shard actors. Everything else (decode, maps, stats, reports) is shared by all methods.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import timm
import torch

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import read_manifest, write_model
from patchaudit.store.objects import ObjectStore, open_store
from patchaudit.workers.backbones import Backbone, load_backbone
from patchaudit.workers.config import ModelConfig, model_config_from_dict
from patchaudit.workers.decode import Preprocess
from patchaudit.workers.geometry import describe as describe_geometry
from patchaudit.workers.registry import model_class

CODE_VERSION = "0.1.0"


@dataclass
class ScoredBatch:
    image_scores: np.ndarray  # (B,) float64
    grid_maps: torch.Tensor | None  # (B, h, w) patch-level scores, None for image-level methods
    knn_ms: float = 0.0  # time spent in nearest-neighbour search for the whole batch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class AnomalyModel:
    """Base class. Subclasses implement fit/embed/score_embeddings/state/load_state and are registered by
    name with `@register("name")` (workers/registry.py), which also sets `method`."""

    method: ClassVar[str] = ""
    needs_index: ClassVar[bool] = False
    has_maps: ClassVar[bool] = True

    def __init__(self, config: ModelConfig, backbone: Backbone) -> None:
        self.config = config
        self.backbone = backbone
        self.threshold: float = float("nan")
        self.calibration: dict[str, Any] = {}
        self.model_id: str = ""
        self.extra_manifest: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def preprocess(self) -> Preprocess:
        c = self.config
        return Preprocess(
            c.image_size,
            c.center_crop,
            jpeg_draft=c.jpeg_draft,
            resize=c.resize,
            geometry=c.geometry,
            stride=self.stride,
            aspect_side=c.aspect_side,
            tile_size=c.tile_size,
            tile_scale=c.tile_scale,
        )

    @property
    def stride(self) -> int:
        """The backbone's deepest stride: aspect-kept and tiled inputs are multiples of it."""
        return max(self.backbone.reductions)

    # -- method-specific ---------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> Any:
        """(B, 3, H, W) -> what score_embeddings takes: a tensor, or one tensor per feature level."""
        raise NotImplementedError

    def score_embeddings(self, emb: torch.Tensor, index: Any = None) -> ScoredBatch:
        raise NotImplementedError

    def map_image_score(self, grid: torch.Tensor, smooth: torch.Tensor) -> float:
        """Image score of a stitched (tiled) image from its patch grid (h, w) and smoothed map (H, W):
        the method's own rule for one image (default: the maximum patch score)."""
        return float(grid.max())

    def fit_threads(self) -> int | None:
        """CPU threads one `fit_embedded` keeps busy, or None for all of them (the default: torch's own
        parallelism). A method whose fit is single-threaded says so, and cross-fitting then fits several
        fold models at once on a machine with spare cores."""
        return None

    def check_input(self, shape: tuple[int, int]) -> str | None:
        """Why this model cannot score a backbone input of `shape` (h, w), or None if it can."""
        return None

    def fit_embedded(self, embeddings: Iterable[Any]) -> None:
        """Fit from the embeddings (as `embed` returns them, one per batch) of defect-free images.

        Cross-fitting calls this once per fold on embeddings computed once, so it must not depend on
        anything but its argument (and the config); the backbone is never run here.
        """
        raise NotImplementedError

    def fit(self, batches: Iterable[torch.Tensor], progress: Any = None) -> None:
        """Fit from normalised image batches (B, 3, H, W) of defect-free images."""

        def embedded() -> Iterator[Any]:
            for x in batches:
                yield self.embed(x.to(self.device))
                if progress is not None:
                    progress(x.shape[0])

        self.fit_embedded(embedded())

    def state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(manifest fields, data files) describing the fitted statistics."""
        raise NotImplementedError

    def load_state(self, manifest: dict[str, Any], store: ObjectStore, **kwargs: Any) -> None:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------------
    def heat_scale(self) -> tuple[float, float]:
        """Fixed colour scale for heatmaps: calibration median to twice the threshold."""
        lo = float(self.calibration.get("score_median", 0.0))
        return lo, max(lo + 1e-6, 2.0 * self.threshold - lo)

    def manifest(self, fields: dict[str, Any]) -> dict[str, Any]:
        import faiss  # only for its version string; present wherever models are fitted

        bb = self.backbone
        return {
            "method": self.method,
            "model_id": self.model_id,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(self.config),
            "backbone": {
                "name": bb.name,
                "weights_sha256": bb.weights_sha256,
                "weights_source": bb.weights_source,
                "out_indices": list(bb.out_indices),
                "channels": list(bb.channels),
                "reductions": list(bb.reductions),
                "mean": list(bb.mean),
                "std": list(bb.std),
            },
            "image_size": list(self.config.image_size),
            "geometry": describe_geometry(self.config),
            "center_crop": list(self.config.center_crop) if self.config.center_crop else None,
            "threshold": self.threshold,
            "calibration": self.calibration,
            **fields,
            **self.extra_manifest,
            "versions": {
                "patchaudit": CODE_VERSION,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "timm": timm.__version__,
                "faiss": faiss.__version__,
                "numpy": np.__version__,
            },
        }

    def save(self, uri_or_store: str | ObjectStore) -> dict[str, Any]:
        store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
        fields, files = self.state()
        # The id covers the manifest's whole content (data file checksums, threshold, config, ...).
        manifest = write_model(store, self.manifest(fields), files, id_prefix=f"{self.method}-{self.backbone.name}")
        self.model_id = manifest["model_id"]
        return manifest


def backbone_for(config: ModelConfig, device: torch.device, expected_weights_sha256: str | None = None) -> Backbone:
    bb = load_backbone(config.backbone, tuple(config.layers), weights=config.weights, device=str(device))
    bb.precision = config.precision
    if expected_weights_sha256 and bb.weights_sha256 != expected_weights_sha256:
        raise ArtifactError(
            f"backbone weights differ from the ones the model was fitted with: found {bb.weights_sha256[:12]} "
            f"({bb.weights_source}), manifest says {expected_weights_sha256[:12]}; install the same weights"
        )
    return bb


def load_model(uri_or_store: str | ObjectStore, device: str = "auto", **kwargs: Any) -> AnomalyModel:
    """Load and verify a fitted model. kwargs go to the method (e.g. knn_backend, load_index)."""
    store = open_store(uri_or_store) if isinstance(uri_or_store, str) else uri_or_store
    manifest = read_manifest(store)
    try:
        config = model_config_from_dict(manifest["config"], fitted=True)
        cls = model_class(manifest["method"])
    except KeyError as exc:
        raise ArtifactError(f"model manifest at {store.uri} lacks field {exc}") from None
    dev = resolve_device(device if device != "auto" else config.device)
    bb = backbone_for(config, dev, manifest["backbone"]["weights_sha256"])
    model = cls(config, bb)
    model.threshold = float(manifest["threshold"])
    model.calibration = dict(manifest.get("calibration", {}))
    model.model_id = manifest["model_id"]
    model.load_state(manifest, store, **kwargs)
    return model
