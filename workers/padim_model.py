"""PaDiM and Gaussian AD behind the common model interface (no index shards; statistics as .npy files)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from patchaudit.store.artifacts import array_from_bytes, array_to_bytes, read_model_file
from patchaudit.errors import ArtifactError
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.gaussian import GaussianFitter, GaussianStats, gaussian_scores
from patchaudit.workers.maps import smooth_maps
from patchaudit.workers.model import AnomalyModel, ScoredBatch
from patchaudit.workers.padim import PadimFitter, PadimStats, padim_scores, select_channels


def arrays_to_files(arrays: dict[str, np.ndarray], prefix: str) -> tuple[list[str], dict[str, bytes]]:
    files = {f"{prefix}{name}.npy": array_to_bytes(a) for name, a in arrays.items()}
    return sorted(arrays), files


def arrays_from_files(store: ObjectStore, manifest: dict[str, Any], names: list[str], prefix: str) -> dict[str, np.ndarray]:
    return {n: array_from_bytes(read_model_file(store, manifest, f"{prefix}{n}.npy")) for n in names}


class PadimModel(AnomalyModel):
    """PaDiM: a Gaussian per position of the finest feature grid; image score = max of the smoothed map."""

    method = "padim"

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.stats: PadimStats | None = None

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return self.backbone.extract(x)  # [(B, C_i, H_i, W_i), ...]; the channel subset is taken in scoring

    def fit(self, batches: Iterable[torch.Tensor], progress: Any = None) -> None:
        cfg = self.config.padim
        idx = select_channels(self.backbone.channels, cfg.n_features, self.config.seed)
        fitter = PadimFitter(idx)
        for x in batches:
            fitter.update(self.embed(x.to(self.device)))
            if progress is not None:
                progress(x.shape[0])
        self.stats = fitter.finalize(eps=cfg.eps).to(self.device)

    def score_embeddings(self, emb: Any, index: Any = None) -> ScoredBatch:
        if self.stats is None:
            raise ArtifactError("PaDiM model is not fitted")
        grid = padim_scores(self.stats, emb)  # (B, h, w)
        smooth = smooth_maps(grid, self.preprocess.input_size, self.config.map_sigma)
        return ScoredBatch(smooth.flatten(1).amax(1).double().cpu().numpy(), grid)

    def state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        if self.stats is None:
            raise ArtifactError("PaDiM model is not fitted")
        names, files = arrays_to_files(self.stats.to_arrays(), "padim_")
        return {"arrays": names, "n_features": self.stats.d, "grid": list(self.stats.grid)}, files

    def load_state(self, manifest: dict[str, Any], store: ObjectStore, **_: Any) -> None:
        arrays = arrays_from_files(store, manifest, manifest["arrays"], "padim_")
        self.stats = PadimStats.from_arrays(arrays).to(self.device)


class GaussianModel(AnomalyModel):
    """Gaussian AD: image-level only (no map); score = sum over stages of Mahalanobis distances."""

    method = "gaussian"
    has_maps = False

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.stats: GaussianStats | None = None

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return self.backbone.extract(x)

    def fit(self, batches: Iterable[torch.Tensor], progress: Any = None) -> None:
        fitter = GaussianFitter()
        for x in batches:
            fitter.update(self.embed(x.to(self.device)))
            if progress is not None:
                progress(x.shape[0])
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
