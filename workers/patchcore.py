"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Fit: locally aware patch features of the defect-free images -> greedy k-center coreset -> memory bank
in faiss, split into shards. Score: each test patch's distance to its nearest bank vector; the image
score is the maximum patch score (optionally the paper's reweighting, eq. 7), the map is the patch
scores on the stride-8 grid (upsampled and smoothed by the shared map code).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from patchaudit.errors import ArtifactError
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.backbones import Backbone
from patchaudit.workers.config import ModelConfig
from patchaudit.workers.coreset import coreset_size, greedy_coreset
from patchaudit.workers.features import flatten_patches, patchcore_embed
from patchaudit.workers.index_files import load_shard, shard_state
from patchaudit.workers.knn import IndexSpec, ShardedIndex, build_shards
from patchaudit.workers.model import AnomalyModel, ScoredBatch
from patchaudit.workers.registry import register


@register("patchcore")
class PatchCoreModel(AnomalyModel):
    needs_index = True

    def __init__(self, config: ModelConfig, backbone: Backbone) -> None:
        super().__init__(config, backbone)
        self.index: ShardedIndex | None = None
        self.bank_size = 0
        self.feature_dim = 0
        self.fit_timings: dict[str, float] = {}

    @property
    def pc(self):
        return self.config.patchcore

    def index_spec(self) -> IndexSpec:
        return IndexSpec(self.pc.index, hnsw_ef_search=self.pc.hnsw_ef_search, ivf_nprobe=self.pc.ivf_nprobe)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, h, w) patch embeddings on the stride of the first feature level."""
        return patchcore_embed(self.backbone.extract(x), self.pc.patch_size, self.pc.feature_dim)

    # -- fit -----------------------------------------------------------------------------------------
    def patch_features(self, batches: Iterable[torch.Tensor], progress: Any = None) -> torch.Tensor:
        """(N, D) float32 CPU patch embeddings of all normalised image batches (B, 3, H, W)."""
        chunks = []
        for x in batches:
            emb = self.embed(x.to(self.device))
            chunks.append(flatten_patches(emb).float().cpu())  # (B*h*w, D)
            if progress is not None:
                progress(x.shape[0])
        if not chunks:
            raise ArtifactError("no training images could be decoded: nothing to fit")
        return torch.cat(chunks)

    def fit_embedded(self, embeddings: Iterable[torch.Tensor]) -> None:
        """Build the memory bank from patch embeddings (B, D, h, w) of defect-free images."""
        chunks = [flatten_patches(emb).float().cpu() for emb in embeddings]  # [(B*h*w, D), ...]
        if not chunks:
            raise ArtifactError("no training images could be decoded: nothing to fit")
        feats = torch.cat(chunks)  # (N, D)
        t1 = time.perf_counter()
        n_select = coreset_size(feats.shape[0], self.pc.coreset_ratio)
        idx = greedy_coreset(
            feats.to(self.device),
            n_select,
            projection_dim=self.pc.coreset_projection_dim,
            seed=self.config.seed,
            method=self.pc.coreset_method,
        ).cpu()
        bank = feats[idx].numpy()  # (n_select, D)
        t2 = time.perf_counter()
        # An exact bank is searched as `score` searches it by default (torch; calibration included) and saved
        # as faiss flat files; ivf/hnsw banks are faiss indexes throughout.
        backend = "torch" if self.pc.index == "flat" else "faiss"
        self.index = ShardedIndex(
            build_shards(
                bank,
                self.pc.shards,
                self.index_spec(),
                backend,
                str(self.device),
                self.config.precision,
                self.config.knn_refine,
            )
        )
        self.bank_size, self.feature_dim = bank.shape
        self.fit_timings = {
            "coreset_s": t2 - t1,
            "index_s": time.perf_counter() - t2,
            "patches": int(feats.shape[0]),
        }

    # -- score ---------------------------------------------------------------------------------------
    def score_embeddings(self, emb: torch.Tensor, index: Any = None) -> ScoredBatch:
        index = index if index is not None else self.index
        if index is None:
            raise ArtifactError("PatchCore model has no memory bank loaded")
        b, d, h, w = emb.shape
        q = flatten_patches(emb).float()  # (B*h*w, D)
        t0 = time.perf_counter()
        k = 1
        dist_sq, ids = index.search_torch(q, k)  # (B*h*w, 1) squared L2, global ids
        patch = dist_sq[:, 0].clamp(min=0).sqrt().view(b, h, w)
        knn_ms = (time.perf_counter() - t0) * 1e3
        scores = patch.view(b, -1).amax(1).double().cpu().numpy()
        if self.pc.score == "reweighted":
            scores = self._reweight(q.view(b, h * w, d), patch.view(b, -1), ids.view(b, h * w), index)
        return ScoredBatch(scores, patch, knn_ms)

    def _reweight(self, q: torch.Tensor, patch: torch.Tensor, ids: torch.Tensor, index: Any) -> np.ndarray:
        """The paper's eq. 7: damp the max patch score when its nearest bank vector sits in a dense region.

        s = (1 - softmax(||q* - m||, m in N_b(m*))[m*]) * s*, with m* the nearest bank vector of the
        most anomalous patch q* and N_b(m*) its b nearest neighbours in the bank (m* included).
        """
        nb = self.pc.reweight_neighbors
        pos = patch.argmax(1)  # (B,)
        rows = torch.arange(q.shape[0], device=q.device)
        q_star = q[rows, pos]  # (B, D)
        m_star_ids = ids[rows, pos].cpu().numpy()
        m_star = torch.from_numpy(index.reconstruct(m_star_ids)).to(q.device)  # (B, D)
        _, nb_ids = index.search_torch(m_star, nb)  # (B, nb), m* itself first
        nb_vecs = torch.from_numpy(index.reconstruct(nb_ids.cpu().numpy().reshape(-1))).to(q.device)
        nb_vecs = nb_vecs.view(q.shape[0], nb, -1)  # (B, nb, D)
        dist = torch.linalg.vector_norm(nb_vecs - q_star[:, None, :], dim=2)  # (B, nb)
        weight = 1.0 - torch.softmax(dist.double(), dim=1)[:, 0]
        s_star = patch[rows, pos].double()
        return (weight * s_star).cpu().numpy()

    # -- artifacts -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        if self.index is None:
            raise ArtifactError("PatchCore model is not fitted")
        files: dict[str, bytes] = {}
        shards = []
        for i, shard in enumerate(self.index.shards):  # vectors as safetensors (+ the faiss index if approximate)
            entry, shard_files = shard_state(i, shard, self.pc.index)
            files.update(shard_files)
            shards.append(entry)
        fields = {
            "feature_dim": self.feature_dim,
            "bank_size": self.bank_size,
            "coreset_ratio": self.pc.coreset_ratio,
            "index_type": self.pc.index,
            "shard_count": len(shards),
            "shards": shards,
        }
        return fields, files

    def load_state(
        self,
        manifest: dict[str, Any],
        store: ObjectStore,
        knn_backend: str = "auto",
        load_index: bool = True,
        **_: Any,
    ) -> None:
        self.bank_size = int(manifest["bank_size"])
        self.feature_dim = int(manifest["feature_dim"])
        if load_index:
            self.index = ShardedIndex(
                [load_shard(store, manifest, i, knn_backend, self.device) for i in range(len(manifest["shards"]))]
            )
