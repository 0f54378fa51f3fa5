"""PaDiM behind the common model interface (no index shards; statistics as .npy files)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import arrays_from_files, arrays_to_files
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.covariance import GaussianStatsError
from patchaudit.workers.maps import smooth_maps
from patchaudit.workers.model import AnomalyModel, ScoredBatch
from patchaudit.workers.padim import PadimFitter, PadimStats, padim_scores, select_channels
from patchaudit.workers.registry import register


@register("padim")
class PadimModel(AnomalyModel):
    """PaDiM: a Gaussian per position of the finest feature grid; image score = max of the smoothed map."""

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.stats: PadimStats | None = None

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone.extract(x)  # [(B, C_i, H_i, W_i), ...]; the channel subset is taken in scoring

    def fit_embedded(self, embeddings: Iterable[Any]) -> None:
        cfg = self.config.padim
        idx = select_channels(self.backbone.channels, cfg.n_features, self.config.seed)
        fitter = PadimFitter(idx)
        for emb in embeddings:
            grid = max((tuple(f.shape[-2:]) for f in emb), key=lambda hw: hw[0] * hw[1])  # the finest map
            if fitter.grid is not None and grid != tuple(fitter.grid):
                c = self._cell
                raise GaussianStatsError(
                    f"PaDiM keeps one Gaussian per patch-grid position, so every training image must become "
                    f"the same input shape; with geometry {self.config.geometry!r} these images give inputs of "
                    f"{grid[0] * c}x{grid[1] * c} and {fitter.grid[0] * c}x{fitter.grid[1] * c} "
                    f"px. Use geometry squash or tile, or images of one shape"
                )
            fitter.update(emb)
        self.stats = fitter.finalize(eps=cfg.eps).to(self.device)

    @property
    def _cell(self) -> int:
        return min(self.backbone.reductions)  # input pixels per cell of the finest grid

    def _grid_of(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (-(-shape[0] // self._cell), -(-shape[1] // self._cell))

    def check_input(self, shape: tuple[int, int]) -> str | None:
        if self.stats is None or self._grid_of(shape) == tuple(self.stats.grid):
            return None
        gh, gw = self.stats.grid
        return (
            f"this PaDiM model was fitted on a {gh}x{gw} patch grid ({gh * self._cell}x{gw * self._cell} px "
            f"inputs, geometry {self.config.geometry!r}); this image becomes a {shape[0]}x{shape[1]} px input. "
            f"PaDiM's per-position statistics need one input shape: score images of the fitted shape, or "
            f"fit with geometry squash or tile"
        )

    def map_image_score(self, grid: torch.Tensor, smooth: torch.Tensor) -> float:
        return float(smooth.max())  # as for one untiled image: the maximum of the smoothed map

    def score_embeddings(self, emb: Any, index: Any = None) -> ScoredBatch:
        if self.stats is None:
            raise ArtifactError("PaDiM model is not fitted")
        grid = padim_scores(self.stats, emb)  # (B, h, w)
        # smoothed at the input's own size (aspect: each shape's), as the pipeline smooths the map
        size = (
            self.preprocess.input_size
            if self.config.geometry == "squash"
            else (grid.shape[1] * self._cell, grid.shape[2] * self._cell)
        )
        smooth = smooth_maps(grid, size, self.config.map_sigma)
        return ScoredBatch(smooth.flatten(1).amax(1).double().cpu().numpy(), grid)

    def state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        if self.stats is None:
            raise ArtifactError("PaDiM model is not fitted")
        names, files = arrays_to_files(self.stats.to_arrays(), "padim_")
        return {"arrays": names, "n_features": self.stats.d, "grid": list(self.stats.grid)}, files

    def load_state(self, manifest: dict[str, Any], store: ObjectStore, **_: Any) -> None:
        arrays = arrays_from_files(store, manifest, manifest["arrays"], "padim_")
        self.stats = PadimStats.from_arrays(arrays).to(self.device)
