"""Gaussian AD behind the common model interface (image-level only; statistics as .npy files)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import arrays_from_files, arrays_to_files
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.gaussian import GaussianFitter, GaussianStats, gaussian_scores
from patchaudit.workers.model import AnomalyModel, ScoredBatch
from patchaudit.workers.registry import register


@register("gaussian")
class GaussianModel(AnomalyModel):
    """Gaussian AD: image-level only (no map); score = sum over stages of Mahalanobis distances."""

    has_maps = False

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.stats: GaussianStats | None = None

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.extract(x)

    def fit_embedded(self, embeddings: Iterable[Any]) -> None:
        fitter = GaussianFitter()
        for emb in embeddings:
            fitter.update(emb)
        self.stats = fitter.finalize(eps=self.config.gaussian.eps).to(self.device)

    def score_embeddings(self, emb: Any, index: Any = None) -> ScoredBatch:
        if self.stats is None:
            raise ArtifactError("Gaussian AD model is not fitted")
        return ScoredBatch(gaussian_scores(self.stats, emb).double().cpu().numpy(), None)

    def state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        if self.stats is None:
            raise ArtifactError("Gaussian AD model is not fitted")
        names, files = arrays_to_files(self.stats.to_arrays(), "gaussian_")
        return {"arrays": names, "stage_channels": list(self.stats.stage_channels)}, files

    def load_state(self, manifest: dict[str, Any], store: ObjectStore, **_: Any) -> None:
        arrays = arrays_from_files(store, manifest, manifest["arrays"], "gaussian_")
        self.stats = GaussianStats.from_arrays(arrays).to(self.device)
