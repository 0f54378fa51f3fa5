"""Greedy k-center coreset (PatchCore's memory-bank subsampling), exact and fast.

PatchCore picks the coreset greedily: start from one patch, then repeatedly add the patch farthest from
everything picked so far (Roth et al. 2022, alg. 1), on a random projection of the features (~128-d) to
make each step cheap. The textbook loop touches all N points at every step: N*D*4 bytes of memory
traffic per step, which on a CPU is memory-bound (~10 ms per step for 190k x 128 here, ~20k steps for a
10% coreset of one MVTec category: minutes).

We run the *same* greedy algorithm, faster, in two ways that compose:

- Triangle-inequality pruning (as in accelerated k-means): points are grouped into compact blocks (a few
  k-means iterations), each with a centre `mu_g` and radius `r_g`. When a centre `c` is added, no point
  of block g can get closer to the coreset than it already is if
  `||c - mu_g|| - r_g >= max_{x in g} mindist(x)`, so the whole block is skipped (`method="pruned"`).
- Many centres per pass (`method="batched"`, the default): the T points currently farthest from the
  coreset are taken as candidates and the greedy loop is replayed on them alone, from their pairwise
  distances. A candidate is the true next greedy pick while its updated distance is at least the
  (T+1)-th largest distance overall, which bounds every other point (distances only shrink). The
  centres found that way update all points in one matrix product (compute-bound) instead of one
  memory-bound matrix-vector product each, with the pruning applied per sub-batch of nearby centres.

Both select what the plain greedy loop selects (up to floating-point ties); `tests/unit/test_coreset.py`
checks that against `method="dense"`. Measured on this project's 2-core CPU (`benchmarks/coreset.py`):
MVTec bottle, 192k x 128 -> 19k: dense 208 s (10.8 ms/step), pruned 8.9 s, batched 7.4 s; magnetic
tile, 442k x 128 -> 44k, where texture patches defeat most of the pruning: dense 1,124 s (25.4 ms/step),
pruned 1,371 s, batched 52 s.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from patchaudit.errors import ConfigError

METHODS = ("batched", "pruned", "dense")


def random_projection(x: torch.Tensor, dim: int | None, seed: int) -> torch.Tensor:
    """Gaussian random projection (N, D) -> (N, dim) (Johnson-Lindenstrauss); identity if D <= dim."""
    if dim is None or x.shape[1] <= dim:
        return x.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    proj = torch.randn(x.shape[1], dim, generator=g) / math.sqrt(dim)  # (D, dim)
    return x.float() @ proj.to(x.device)


def coreset_size(n_points: int, ratio: float) -> int:
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"coreset ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_points, int(round(n_points * ratio))))


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    projection_dim: int | None = 128,
    seed: int = 0,
    method: str = "pruned",
    n_clusters: int | None = None,
) -> torch.Tensor:
    """Indices (n_select,) of a greedy k-center coreset of `features` (N, D), on their device.

    method: "batched" (default: exact greedy, many centres per pass, cluster pruning), "pruned" (exact
    greedy, one centre per pass, cluster pruning) or "dense" (the textbook loop).
    """
    n = features.shape[0]
    if not 1 <= n_select <= n:
        raise ConfigError(f"coreset size must be in [1, {n}], got {n_select}")
    z = random_projection(features, projection_dim, seed)  # (N, d)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    if method == "dense":
        return _greedy_dense(z, n_select, start)
    if method == "batched":  # matrix products: intra-op threads pay off
        return _greedy_batched(z, n_select, start, n_clusters, seed)
    if method == "pruned":
        if z.device.type != "cpu":
            return _greedy_pruned(z, n_select, start, n_clusters, seed)
        # Each step is ~15 small ops; with intra-op threads every op pays a thread barrier that costs
        # more than the op itself (and far more on a loaded machine), so the loop runs on one thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _greedy_pruned(z, n_select, start, n_clusters, seed)
        finally:
            torch.set_num_threads(threads)
    raise ConfigError(f"unknown coreset method {method!r}; valid: {', '.join(map(repr, METHODS))}")


def _greedy_dense(z: torch.Tensor, n_select: int, start: int) -> torch.Tensor:
    sq = (z * z).sum(1)  # (N,)
    mind = torch.full_like(sq, float("inf"))
    sel = torch.empty(n_select, dtype=torch.long)
    j = start
    for i in range(n_select):
        sel[i] = j
        d = torch.addmv(sq, z, z[j], alpha=-2.0).add_(sq[j])  # ||x - c||^2 for all x
        torch.minimum(mind, d, out=mind)
        j = int(torch.argmax(mind))
    return sel.to(z.device)


def kmeans_assign(z: torch.Tensor, k: int, seed: int, iters: int = 6, sample: int = 32768) -> torch.Tensor:
    """A few Lloyd iterations on a sample, then assign every point: cluster ids (N,).

    Only compact groups are needed for pruning (any partition is correct), so this is deliberately cheap.
    """
    n = z.shape[0]
    g = torch.Generator().manual_seed(seed)
    sample_idx = torch.randperm(n, generator=g)[: min(n, sample)].to(z.device)
    zs = z[sample_idx]
    centers = zs[torch.randperm(zs.shape[0], generator=g)[:k].to(z.device)].clone()  # (k, d)
    for _ in range(iters):
        a = _nearest_center(zs, centers)
        sums = torch.zeros_like(centers).index_add_(0, a, zs)
        counts = torch.bincount(a, minlength=k).unsqueeze(1)
        nonempty = counts.squeeze(1) > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty]
    return _nearest_center(z, centers)


def _nearest_center(z: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    csq = (centers * centers).sum(1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for s in range(0, z.shape[0], chunk):
        # argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c)
        out[s : s + chunk] = torch.addmm(csq, z[s : s + chunk], centers.T, alpha=-2.0).argmin(1)
    return out


def _greedy_pruned(
    z: torch.Tensor, n_select: int, start: int, n_clusters: int | None, seed: int, block: int = 64
) -> torch.Tensor:
    dim = z.shape[1]
    dev = z.device
    # Padding slots repeat their block's last row: a padded copy has exactly its original's distances,
    # so it never changes a max.
    table, _, zp, mu, radius = _grouped(z, n_clusters, seed, block)
    g_count = table.shape[0]
    musq = (mu * mu).sum(1)  # (G,)
    sqp = (zp * zp).sum(2)  # (G, block)
    flat = zp.reshape(-1, dim)
    mind = torch.full_like(sqp, float("inf"))  # (G, block) squared distance to the coreset
    gmax = torch.full((g_count,), float("inf"), device=dev)  # max of mind per group
    sel = torch.empty(n_select, dtype=torch.long, device=dev)
    pos = int(torch.nonzero(table.reshape(-1) == start)[0])
    for i in range(n_select):
        sel[i] = pos
        c = flat[pos]
        csq = sqp.view(-1)[pos]
        dc = torch.addmv(musq, mu, c, alpha=-2.0).add_(csq).clamp_(min=0).sqrt_()  # (G,) ||mu_g - c||
        lb = (dc - radius).clamp_(min=0)
        gidx = torch.nonzero(lb * lb < gmax).squeeze(1)  # groups that may hold a point now closer
        if gidx.numel() > g_count // 2:  # most groups: one dense pass beats gathering
            d = torch.addmv(sqp.view(-1), flat, c, alpha=-2.0).add_(csq).view(g_count, block)
            torch.minimum(mind, d, out=mind)
            gmax = mind.amax(1)
        elif gidx.numel() > 0:
            zg = zp.index_select(0, gidx)  # (k, block, d)
            d = torch.addmv(sqp.index_select(0, gidx).view(-1), zg.view(-1, dim), c, alpha=-2.0).add_(csq)
            m = torch.minimum(mind.index_select(0, gidx), d.view(-1, block))
            mind.index_copy_(0, gidx, m)
            gmax.index_copy_(0, gidx, m.amax(1))
        g = int(torch.argmax(gmax))
        pos = g * block + int(torch.argmax(mind[g]))
    return table.reshape(-1)[sel]


def _grouped(z: torch.Tensor, n_clusters: int | None, seed: int, block: int):
    """Rows grouped by k-means cluster into blocks of `block` rows.

    Returns (table (G, block) original row of each slot, pad (G, block) True on padding slots,
    zp (G, block, d), mu (G, d) block centres, radius (G,) block radii).
    """
    n, dim = z.shape
    k = n_clusters or max(1, min(n // block, int(4 * math.sqrt(n))))
    assign = kmeans_assign(z, k, seed)
    order = torch.argsort(assign, stable=True).cpu()
    counts = torch.bincount(assign, minlength=k).cpu()
    counts = counts[counts > 0]
    rows, pads = [], []
    for cluster_rows in torch.split(order, counts.tolist()):
        for grp in torch.split(cluster_rows, block):
            pad = torch.zeros(block, dtype=torch.bool)
            pad[grp.numel() :] = True
            if grp.numel() < block:
                grp = torch.cat([grp, grp[-1:].expand(block - grp.numel())])
            rows.append(grp)
            pads.append(pad)
    table = torch.stack(rows).to(z.device)
    pad = torch.stack(pads).to(z.device)
    zp = z[table.reshape(-1)].reshape(table.shape[0], block, dim)
    mu = zp.mean(1)
    radius = (zp - mu[:, None, :]).norm(dim=2).amax(1) * (1 + 1e-5) + 1e-6  # slack for rounding
    return table, pad, zp, mu, radius


def _greedy_batched(
    z: torch.Tensor,
    n_select: int,
    start: int,
    n_clusters: int | None,
    seed: int,
    block: int = 64,
    max_candidates: int = 512,
    chunk_rows: int = 32768,
    sub_batch: int = 64,
) -> torch.Tensor:
    """The greedy selection, many centres per pass over the data (exact up to floating-point ties).

    Each round takes the T points farthest from the coreset (top-T of the current min-distances) and
    replays the greedy loop on them alone, using their pairwise distances: the next greedy pick is the
    candidate with the largest updated min-distance, as long as that value is at least the (T+1)-th
    largest min-distance (an upper bound for every non-candidate, whose distances only shrink). When
    that no longer holds the round ends, and all picks of the round update the min-distances of all
    points in one matrix product, skipping blocks that the triangle inequality proves unaffected (as in
    `_greedy_pruned`). One pass per round instead of one per centre turns a memory-bound loop of
    matrix-vector products into compute-bound matrix products.
    """
    n, dim = z.shape
    table, pad, zp, mu, radius = _grouped(z, n_clusters, seed, block)
    g_count = table.shape[0]
    flat = zp.reshape(-1, dim)
    sqf = (flat * flat).sum(1)  # (G*block,)
    musq = (mu * mu).sum(1)
    mind = torch.full((g_count, block), float("inf"), device=z.device)
    mind[pad] = float("-inf")  # padding slots are never picked and never bound anything
    mind_flat = mind.view(-1)
    gmax = torch.full((g_count,), float("inf"), device=z.device)
    gchunk = max(1, chunk_rows // block)
    picked: list[torch.Tensor] = []
    n_picked = 0
    batch = torch.nonzero(table.reshape(-1) == start)[:1, 0]  # slot of the start row
    cand_n = min(16, max_candidates)
    while True:
        picked.append(batch)  # in greedy order
        n_picked += batch.numel()
        if n_picked >= n_select:
            break
        # -- all points: min-distance to the new centres (blocks the bound proves unaffected are skipped)
        batch = batch.sort().values  # slots are grouped by cluster: neighbours in the batch are near
        bsq_all = sqf[batch]
        dcb = torch.addmm(musq[:, None], mu, flat[batch].T, alpha=-2.0).add_(bsq_all).clamp_(min=0).sqrt_()
        lb = (dcb - radius[:, None]).clamp_(min=0)  # (G, b) lower bound of the distance block -> centre
        need = lb.mul_(lb) < gmax[:, None]  # (G, b) pairs that may lower a min-distance
        for s0 in range(0, batch.numel(), sub_batch):
            sub = batch[s0 : s0 + sub_batch]
            bz = flat[sub]
            bsq = bsq_all[s0 : s0 + sub_batch]
            gi_all = torch.nonzero(need[:, s0 : s0 + sub_batch].any(1)).squeeze(1)
            if gi_all.numel() > g_count // 2:
                spans, gsel = range(0, g_count, gchunk), None
            else:
                spans, gsel = range(0, gi_all.numel(), gchunk), gi_all
            for s in spans:
                gi = slice(s, s + gchunk) if gsel is None else gsel[s : s + gchunk]
                rows = zp[gi].reshape(-1, dim)
                d = torch.addmm(sqf.view(g_count, block)[gi].reshape(-1, 1), rows, bz.T, alpha=-2.0).add_(bsq)
                m = torch.minimum(mind[gi], d.amin(1).view(-1, block))
                mind[gi] = m
                gmax[gi] = m.amax(1)
        mind_flat[batch] = float("-inf")  # picked: never again
        # -- candidates: replay the greedy loop on the T farthest points
        t = min(cand_n, n - n_picked)
        top_vals, top_idx = torch.topk(mind_flat, min(t + 1, mind_flat.numel()))
        bound = float(top_vals[t]) if top_vals.numel() > t else float("-inf")
        cand = top_idx[:t]
        cz = flat[cand]
        csq = sqf[cand]
        dcc = torch.addmm(csq[:, None], cz, cz.T, alpha=-2.0).add_(csq).cpu().numpy()  # (t, t)
        v = top_vals[:t].cpu().numpy().copy()
        want = n_select - n_picked
        acc: list[int] = []
        while len(acc) < want:
            j = int(v.argmax())
            if not v[j] >= bound or v[j] == float("-inf"):
                break
            acc.append(j)
            np.minimum(v, dcc[j], out=v)
            v[j] = float("-inf")
        batch = cand[torch.as_tensor(acc, dtype=torch.long, device=cand.device)]
        if len(acc) * 2 >= t:
            cand_n = min(max_candidates, cand_n * 2)
        elif len(acc) * 8 < t:
            cand_n = max(min(16, max_candidates), cand_n // 2)
    sel = torch.cat(picked)[:n_select]
    return table.reshape(-1)[sel]
