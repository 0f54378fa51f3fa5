"""Nearest-neighbour search over a memory bank split into shards: faiss or torch, then "ask every shard, merge".

A shard holds a contiguous slice of the bank and answers with squared L2 distances and *global* ids
(its offset added). `merge_topk` is the pure merge the distributed scorer uses; it is tested against
one flat index over the whole bank. The torch backend exists for GPU hosts without faiss-gpu and for
machines without faiss at all: a chunked matmul k-NN (`||q||^2 - 2 q.b + ||b||^2`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchaudit.errors import ConfigError

BACKENDS = ("faiss", "torch")
LOW_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}  # TorchShard's reduced-precision search types
INDEX_TYPES = ("flat", "hnsw", "ivf")
PREFILTERS = ("auto", "fp32", "bf16")  # TorchShard's k=1 CPU search: the type of its first, pruning stage


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def split_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of near-equal size covering range(n)."""
    if shards < 1:
        raise ConfigError(f"shard count must be >= 1, got {shards}")
    if shards > n:
        raise ConfigError(f"cannot split a bank of {n} vectors into {shards} shards")
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (dist (M, k_i), global ids (M, k_i)) into the k smallest per query row."""
    if not results:
        raise ValueError("merge_topk needs at least one shard result")
    d = np.concatenate([r[0] for r in results], axis=1)  # (M, sum k_i)
    ids = np.concatenate([r[1] for r in results], axis=1)
    if d.shape[1] == k:
        order = np.argsort(d, axis=1, kind="stable")
    else:
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(part, np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable"), 1)
    return np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)


@dataclass(frozen=True)
class IndexSpec:
    """Which index a shard builds. `flat` is exact; the others are approximate (measure recall)."""

    index_type: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 0  # 0 = default_nlist(n): about 4*sqrt(n), at most n/39
    ivf_nprobe: int = 16

    def __post_init__(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ConfigError(f"unknown index type {self.index_type!r}; valid: {', '.join(INDEX_TYPES)}")


def exact_sq_distances(q: np.ndarray, ids: np.ndarray, reconstruct) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances of the found neighbours recomputed as sum((q - v)^2), sorted per row.

    BLAS-based search computes ||q||^2 - 2 q.v + ||v||^2: it loses digits to cancellation, and the
    rounding depends on thread count and batch blocking. Recomputing the few found pairs directly makes
    sharded, unsharded, single-process and distributed scores agree to float32 rounding (and gives
    approximate indexes exact distances to the neighbours they found). Costs O(M k D), not O(M N D).
    """
    valid = ids >= 0
    vecs = reconstruct(np.where(valid, ids, 0).reshape(-1)).reshape(*ids.shape, -1)  # (M, k, D)
    d = np.square(q[:, None, :] - vecs).sum(-1, dtype=np.float32)  # (M, k)
    d[~valid] = np.inf
    if ids.shape[1] > 1:
        order = np.argsort(d, axis=1, kind="stable")
        d, ids = np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
    return d, ids


class Shard:
    """One slice of the bank: `search(q, k)` -> (squared L2 (M, k) float32, global ids (M, k) int64)."""

    offset: int
    ntotal: int

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def reconstruct(self, local_ids: np.ndarray) -> np.ndarray:
        """Stored vectors (n, D) for shard-local ids."""
        raise NotImplementedError

    def vectors(self) -> np.ndarray:
        """All stored vectors (ntotal, D) float32, in shard-local id order."""
        raise NotImplementedError


def default_nlist(n: int) -> int:
    """IVF lists for n vectors: about 4*sqrt(n), but at least 39 training points per list, the minimum
    faiss's k-means asks for (it warns below it); at least 1."""
    return max(1, min(int(4 * np.sqrt(n)), n // 39))


class FaissShard(Shard):
    def __init__(self, index, offset: int = 0) -> None:  # index: faiss.Index
        self.index = index
        self.offset = offset
        self.ntotal = int(index.ntotal)

    @classmethod
    def build(cls, vectors: np.ndarray, offset: int = 0, spec: IndexSpec = IndexSpec()) -> FaissShard:
        import faiss

        x = np.ascontiguousarray(vectors, dtype=np.float32)
        d = x.shape[1]
        if spec.index_type == "flat":
            index = faiss.IndexFlatL2(d)
        elif spec.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, spec.hnsw_m)
            index.hnsw.efSearch = spec.hnsw_ef_search
        else:
            nlist = spec.ivf_nlist or default_nlist(len(x))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.train(x)
            index.nprobe = spec.ivf_nprobe
        index.add(x)
        return cls(index, offset)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        _, i = self.index.search(q, k)
        d, i = exact_sq_distances(q, i, self.reconstruct)
        return d, np.where(i >= 0, i + self.offset, -1)

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, offset: int) -> FaissShard:
        import faiss

        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), offset)

    def reconstruct(self, local_ids: np.ndarray) -> np.ndarray:
        if hasattr(self.index, "make_direct_map") and not getattr(self, "_direct_map", False):
            self.index.make_direct_map()  # IVF: id -> list position, built once
            self._direct_map = True
        return self.index.reconstruct_batch(np.ascontiguousarray(local_ids, dtype=np.int64))

    def vectors(self) -> np.ndarray:
        """All stored vectors (N, D) (exact for flat and HNSW-flat; IVF-flat returns them unordered-safe)."""
        if hasattr(self.index, "make_direct_map"):
            self.index.make_direct_map()
        return self.index.reconstruct_n(0, self.ntotal)


# Unit roundoff of bfloat16 (8 significant bits, round to nearest even) and float32.
_U_BF16 = 2.0**-8
_U_FP32 = 2.0**-24


def _split_bf16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (fp32) as hi + lo, both bfloat16: hi + lo equals x to a relative 2**-16."""
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def coherent_order(x: torch.Tensor, leaf: int, iterations: int = 20) -> torch.Tensor:
    """A permutation of the rows of x (N, D) that puts near vectors near each other: split at the median
    of the top principal direction (power iteration from a fixed start), recursively, down to runs of
    at most `leaf` rows (whole multiples of `leaf` on the left of every split)."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(x.shape[1], generator=gen, dtype=x.dtype)
    out: list[torch.Tensor] = []

    def split(ix: torch.Tensor) -> None:
        if len(ix) <= leaf:
            out.append(ix)
            return
        xs = x[ix] - x[ix].mean(0)
        v = start.clone()
        for _ in range(iterations):
            v = xs.T @ (xs @ v)
            v = v / v.norm().clamp_min(1e-30)
        o = ix[torch.argsort(xs @ v, stable=True)]
        half = max(leaf, len(o) // 2 // leaf * leaf)
        split(o[:half])
        split(o[half:])

    split(torch.arange(x.shape[0]))
    return torch.cat(out)


class _PrunedNearest:
    """Exact 1-NN on the CPU: every query's smallest distance per cell of `cell` bank vectors first, then
    the nearest vector searched only in the cell(s) that can hold it.

    Stage 1 computes, per query and cell, the smallest distance in the cell, a chunk of cells at a time.
    With fp32 that is one GEMM per chunk of [q, 1] against [-2b, ||b||^2] (no separate bias pass) and a
    minimum without indices (vectorised; `min` with indices costs ~10x more per element on CPU). With
    bf16 the GEMM runs on a bfloat16 copy of the bank (AVX512-BF16: ~2.4x the fp32 rate on AMD EPYC),
    centred on the bank mean, with both squared norms carried as extra hi/lo columns so that the
    matmul's output is the distance itself (small near the minimum, so the output's bf16 rounding is).

    Stage 2 searches exactly (fp32 GEMM, argmin) only the cells a query may find its nearest vector in:
    for fp32 the cell with the smallest minimum; for bf16 every cell whose minimum could be the smallest
    within a rigorous bound on the bf16 distances' error (`_bf16_error`), so bf16 returns what the fp32
    search returns, only cheaper. Among (nearly) tied vectors any one may be returned, as in fp32.
    """

    def __init__(self, bank: torch.Tensor, chunk: int, query_block: int, bf16: bool) -> None:
        self.n = bank.shape[0]
        self.cell = min(128, chunk)
        self.chunk = max(self.cell, chunk - chunk % self.cell)  # a whole number of cells
        self.query_block = query_block
        self.starts = list(range(0, self.n, self.chunk))
        self.n_cells = -(-self.n // self.cell)
        # fp32 [-2b, ||b||^2]: [q, 1] @ this.T = ||b||^2 - 2 q.b, the distance less ||q||^2 (same per row)
        self.aug32 = torch.cat([-2.0 * bank, bank.square().sum(1, keepdim=True)], 1).contiguous()
        self.low = bf16
        self.order: torch.Tensor | None = None
        if self.low:
            # Cells of near vectors: a query's far cells then have clearly larger minima, so the bound
            # keeps ~2 cells per query on bottle's bank instead of ~9 in the bank's own order.
            self.order = coherent_order(bank, self.cell)
            bank = bank[self.order]
            self.aug32 = self.aug32[self.order].contiguous()
            # centred on the bank mean: distances do not change, the dot products bf16 rounds get smaller
            self.mean = bank.mean(0, keepdim=True)
            centred = bank - self.mean
            b16 = centred.to(torch.bfloat16)
            nb_hi, nb_lo = _split_bf16(centred.square().sum(1, keepdim=True))
            one = torch.ones_like(nb_hi)
            # [-2 b~, 1, 1, hi(||b||^2), lo(||b||^2)]; the queries get [q~, hi(||q||^2), lo(||q||^2), 1, 1]
            self.aug16 = torch.cat([-2.0 * b16, one, one, nb_hi, nb_lo], 1).contiguous()
            norms = centred.norm(dim=1)
            pad = self.n_cells * self.cell - self.n
            self.cell_norm = F.pad(norms, (0, pad)).view(self.n_cells, self.cell).amax(1)  # (cells,) for the bound
            self.terms = centred.shape[1] + 4

    def _cell_mins(self, d: torch.Tensor) -> torch.Tensor:
        """(m, L) distances of one chunk -> (m, ceil(L / cell)) minima per cell."""
        m, length = d.shape
        whole = length - length % self.cell
        parts = [d[:, :whole].reshape(m, -1, self.cell).amin(2)] if whole else []
        if whole < length:
            parts.append(d[:, whole:].amin(1, keepdim=True))
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def _bf16_error(self, v: torch.Tensor, nq: torch.Tensor) -> torch.Tensor:
        """Bound on |v - true cell minimum| for the bf16 cell minima v (m, cells) of queries with centred
        norms nq (m, 1).

        Per pair: rounding q and b to bf16 moves q.b by at most (2u + u^2) sum|q_i b_i| <= (2u + u^2)|q||b|
        (u = 2**-8), the distance by twice that; the hi/lo norms are exact to u^2 ||.||^2; fp32
        accumulation of K terms adds at most K u32 (|q| + |b|)^2; the output's bf16 rounding u |v|.
        A cell's minimum moves by at most the largest of its pairs' bounds (|b| <= the cell's largest
        norm). The factor 1.05 and the doubled terms cover the second-order products left out.
        """
        u = _U_BF16
        nb = self.cell_norm.unsqueeze(0)
        e = 2.0 * (2.0 * u + u * u) * nq * nb + (2 * u * u + 2 * self.terms * _U_FP32) * (nq + nb).square()
        return 1.05 * (u * (v.abs() + 2.0 * e) + e)

    def _candidates(self, q: torch.Tensor) -> torch.Tensor:
        """(m, cells) bool: the cells each query's nearest vector may be in."""
        m = q.shape[0]
        if not self.low:
            qa = torch.cat([q, torch.ones((m, 1), dtype=q.dtype)], 1)
            mins = torch.cat([self._cell_mins(torch.mm(qa, self.aug32[s : s + self.chunk].T)) for s in self.starts], 1)
            return mins <= mins.amin(1, keepdim=True)  # the winning cell (several only on exact ties)
        qc = q - self.mean
        nq2 = qc.square().sum(1, keepdim=True)
        hi, lo = _split_bf16(nq2)
        one = torch.ones_like(hi)
        qa16 = torch.cat([qc.to(torch.bfloat16), hi, lo, one, one], 1)
        mins = torch.cat(
            [self._cell_mins(torch.mm(qa16, self.aug16[s : s + self.chunk].T)) for s in self.starts], 1
        ).float()
        err = self._bf16_error(mins, nq2.sqrt())
        return (mins - err) <= (mins + err).amin(1, keepdim=True)

    def candidates(self, q: torch.Tensor) -> torch.Tensor:
        """(M, cells) bool for all queries, `query_block` at a time."""
        return torch.cat(
            [self._candidates(q[i : i + self.query_block]) for i in range(0, q.shape[0], self.query_block)]
        )

    def nearest(self, q: torch.Tensor) -> torch.Tensor:
        """q: (M, D) float32 -> local ids (M, 1) of the nearest bank vectors."""
        m = q.shape[0]
        pairs = self.candidates(q).T.nonzero()  # (P, 2) (cell, row), grouped by cell
        counts = torch.bincount(pairs[:, 0], minlength=self.n_cells).tolist()
        rows_all = pairs[:, 1]
        qa = torch.cat([q, torch.ones((m, 1), dtype=q.dtype)], 1)
        vals, ids = torch.empty(len(pairs)), torch.empty(len(pairs), dtype=torch.long)
        pos = 0
        for cell, count in enumerate(counts):
            if count == 0:
                continue
            s = cell * self.cell
            rows = rows_all[pos : pos + count]
            d, i = torch.mm(qa[rows], self.aug32[s : s + self.cell].T).min(1)
            vals[pos : pos + count], ids[pos : pos + count] = d, i + s
            pos += count
        # per row, the smallest of its candidates' values (any one of equal values)
        best = torch.full((m,), float("inf")).scatter_reduce(0, rows_all, vals, "amin")
        win = vals == best[rows_all]
        out = torch.zeros(m, dtype=torch.long)
        out[rows_all[win]] = ids[win]
        return (out if self.order is None else self.order[out]).unsqueeze(1)


class TorchShard(Shard):
    """Exact k-NN by blocked matmul on CPU or GPU (for hosts without faiss-gpu, and CPUs where it beats faiss).

    Distances are computed for `query_block` queries against `chunk` bank vectors at a time (on CPU, blocks
    small enough to stay in cache: 2048 x 1024 ran 3x faster than faiss `IndexFlatL2` on a 2-core Xeon,
    `benchmarks/knn.py`); k=1 keeps a running minimum instead of a top-k merge. The found pairs' distances
    are then recomputed exactly (no `||q||^2 - 2 q.b + ||b||^2` cancellation in the reported scores).
    Among bank vectors at (nearly) the same distance any one may be returned, not necessarily the lowest
    id: which one depends on the GEMM's rounding (CPU, chunk, thread count); its distance is exact.

    k=1 on the CPU (PatchCore's scoring) takes `_PrunedNearest` instead: cell minima first, then the exact
    search of the cells that can hold the nearest vector. `prefilter` is the cell minima's type: bf16
    where the CPU multiplies it natively (`auto`; AVX512-BF16 or AMX), which returns what fp32 returns
    (a rigorous error bound decides which cells are searched exactly), else fp32.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        offset: int = 0,
        device: str = "cpu",
        chunk: int | None = None,
        query_block: int | None = None,
        precision: str = "fp32",
        refine: int = 8,
        prefilter: str = "auto",
    ) -> None:
        if precision not in LOW_PRECISION and precision != "fp32":
            raise ConfigError(f"k-NN precision {precision!r} is not valid; choose one of: fp32, bf16, fp16")
        if prefilter not in PREFILTERS:
            raise ConfigError(f"k-NN prefilter {prefilter!r} is not valid; choose one of: {', '.join(PREFILTERS)}")
        self.offset = offset
        self.ntotal = int(vectors.shape[0])
        self.device = torch.device(device)
        self.bank = torch.as_tensor(np.ascontiguousarray(vectors, dtype=np.float32), device=self.device)  # (N, D)
        self.precision = precision
        self.refine = max(1, refine)
        if precision == "fp32":
            self.mean = None
            self.search_bank = self.bank
        else:
            # Centred on the bank mean before rounding: distances do not change, the dot products that the
            # half-precision matmul rounds get much smaller (the vectors share a large common offset).
            self.mean = self.bank.mean(0, keepdim=True)  # (1, D)
            self.search_bank = (self.bank - self.mean).to(getattr(torch, LOW_PRECISION[precision]))
        self.bank_sq = self.search_bank.float().square().sum(1)  # (N,) norms of the vectors the matmul sees
        cpu = self.device.type == "cpu"
        self.chunk = chunk or (1024 if cpu else 65536)
        self.query_block = query_block or (2048 if cpu else 1 << 30)
        if prefilter == "auto":  # bf16 only where the CPU multiplies it natively; else it is slower than fp32
            prefilter = "bf16" if precision == "bf16" or cpu_has_bf16() else "fp32"
        self.prefilter = prefilter
        self._pruned: _PrunedNearest | None = None  # the CPU k=1 search, built on first use

    def _nearest_cpu(self, q: torch.Tensor) -> torch.Tensor:
        """k=1 on the CPU: local ids (m, 1) of the nearest bank vectors (see `_PrunedNearest`)."""
        if self._pruned is None:
            self._pruned = _PrunedNearest(self.bank, self.chunk, self.query_block, self.prefilter == "bf16")
        return self._pruned.nearest(q)

    def _block(self, q, k: int):
        """One query block against the whole shard: local ids (m, k) of the nearest by the expansion, nearest
        first (||q||^2 is the same for a whole row, so it is left out of the comparison)."""
        best_d = best_i = None
        for s in range(0, self.ntotal, self.chunk):
            if self.mean is None:
                d = torch.addmm(
                    self.bank_sq[s : s + self.chunk].unsqueeze(0), q, self.search_bank[s : s + self.chunk].T, alpha=-2.0
                )
            else:  # (m, chunk) dot products in half precision (fp32 accumulation), the rest in fp32
                dots = (q @ self.search_bank[s : s + self.chunk].T).float()
                d = self.bank_sq[s : s + self.chunk].unsqueeze(0) - 2.0 * dots
            if k == 1:
                dd, ii = d.min(1, keepdim=True)
                ii = ii + s
                if best_d is None:
                    best_d, best_i = dd, ii
                else:  # strict <: on equal computed values the earlier chunk's id stays. That is no
                    # promise about true ties: the GEMM may round equal distances an ulp apart in
                    # different output columns (differently per CPU), so any of the tied ids may win.
                    better = dd < best_d
                    best_d, best_i = torch.where(better, dd, best_d), torch.where(better, ii, best_i)
                continue
            dd, ii = torch.topk(d, min(k, d.shape[1]), dim=1, largest=False)
            ii = ii + s
            if best_d is None:
                best_d, best_i = dd, ii
            else:
                cat_d, cat_i = torch.cat([best_d, dd], 1), torch.cat([best_i, ii], 1)
                best_d, pos = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, pos)
        return best_i

    def search_tensor(self, q, k: int = 1):
        """q: (M, D) float tensor on any device -> (squared dist (M, k), global ids (M, k)) on self.device."""
        q = q.to(self.device, torch.float32)
        kk = min(k, self.ntotal)
        if q.shape[0] == 0 or kk == 0:
            empty = torch.empty((q.shape[0], kk), device=self.device)
            return empty, empty.long()
        starts = range(0, q.shape[0], self.query_block)
        if kk == 1 and self.device.type == "cpu" and self.precision != "fp16":
            best_i = self._nearest_cpu(q)
        elif self.mean is None:
            best_i = torch.cat([self._block(q[i : i + self.query_block], kk) for i in starts])
        else:  # the best `refine` candidates by the half-precision distances, re-ranked exactly below
            qc = (q - self.mean).to(self.search_bank.dtype)
            kc = min(max(kk, self.refine), self.ntotal)
            best_i = torch.cat([self._block(qc[i : i + self.query_block], kc) for i in starts])
        # Exact distances of the found pairs (see exact_sq_distances): no cancellation, no blocking effects.
        best_d = (q.unsqueeze(1) - self.bank[best_i]).square().sum(-1)  # (M, k or refine)
        if best_i.shape[1] > 1:
            best_d, order = torch.sort(best_d, dim=1, stable=True)
            best_i = torch.gather(best_i, 1, order)
            best_d, best_i = best_d[:, :kk], best_i[:, :kk]
        return best_d, best_i + self.offset

    def vectors(self) -> np.ndarray:
        """All stored vectors (ntotal, D) float32, in id order (a copy)."""
        return self.bank.cpu().numpy().copy()

    def reconstruct(self, local_ids: np.ndarray) -> np.ndarray:
        return self.bank[np.asarray(local_ids, dtype=np.int64)].cpu().numpy()

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        d, i = self.search_tensor(torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)), k)
        return d.cpu().numpy(), i.cpu().numpy()


class ShardedIndex:
    """All shards in one process: the single-process scorer and the reference for the distributed one."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)
        self.ntotal = sum(s.ntotal for s in self.shards)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        results = [s.search(queries, k) for s in self.shards]
        return results[0] if len(results) == 1 else merge_topk(results, k)

    def search_torch(self, q, k: int = 1):
        """Torch in, torch out on q's device; a single torch shard never leaves the GPU."""
        if len(self.shards) == 1 and isinstance(self.shards[0], TorchShard):
            d, i = self.shards[0].search_tensor(q, k)
            return d.to(q.device), i.to(q.device)
        d, i = self.search(q.detach().float().cpu().numpy(), k)
        return torch.from_numpy(d).to(q.device), torch.from_numpy(i).to(q.device)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """Bank vectors (len(ids), D) for global ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = None
        for s in self.shards:
            mask = (ids >= s.offset) & (ids < s.offset + s.ntotal)
            if not mask.any():
                continue
            vecs = s.reconstruct(ids[mask] - s.offset)
            if out is None:
                out = np.empty((len(ids), vecs.shape[1]), dtype=np.float32)
            out[mask] = vecs
        if out is None or len(out) != len(ids):
            raise IndexError("ids outside the bank")
        return out


def build_shards(
    bank: np.ndarray,
    n_shards: int,
    spec: IndexSpec = IndexSpec(),
    backend: str = "faiss",
    device: str = "cpu",
    precision: str = "fp32",
    refine: int = 8,
) -> list[Shard]:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown k-NN backend {backend!r}; valid: {', '.join(BACKENDS)}")
    shards: list[Shard] = []
    for a, b in split_ranges(len(bank), n_shards):
        if backend == "faiss":
            shards.append(FaissShard.build(bank[a:b], a, spec))
        else:
            shards.append(TorchShard(bank[a:b], a, device, precision=precision, refine=refine))
    return shards
