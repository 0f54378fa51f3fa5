"""Greedy k-center coreset (PatchCore's memory-bank subsampling), exact and fast.

PatchCore picks the coreset greedily: start from one patch, then repeatedly add the patch farthest from
everything picked so far (Roth et al. 2022, alg. 1), on a random projection of the features (~128-d) to
make each step cheap. The textbook loop touches all N points at every step: N*D*4 bytes of memory
traffic per step, which on a CPU is memory-bound (~10 ms per step for 190k x 128 here, ~20k steps for a
10% coreset of one MVTec category: minutes).

We run the *same* greedy algorithm with triangle-inequality pruning (as in accelerated k-means): points
are grouped into compact clusters (a few k-means iterations), each with a centre `mu_g` and radius `r_g`.
When a new centre `c` is added, no point of cluster g can get closer to the coreset than it already is
if `||c - mu_g|| - r_g >= max_{x in g} mindist(x)`, so the whole cluster is skipped. Early steps update
everything; once the coreset covers the data most clusters are skipped, and the cost per step becomes
proportional to the neighbourhood of the new centre. The selection equals the plain greedy selection
(up to floating-point ties); `tests/unit/test_coreset.py` checks that against `method="dense"`.
"""

from __future__ import annotations

import math

import torch

from store.errors import ConfigError


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

    method: "pruned" (default, exact greedy with cluster pruning) or "dense" (textbook loop).
    """
    n = features.shape[0]
    if not 1 <= n_select <= n:
        raise ConfigError(f"coreset size must be in [1, {n}], got {n_select}")
    z = random_projection(features, projection_dim, seed)  # (N, d)
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    if method == "dense":
        return _greedy_dense(z, n_select, start)
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
    raise ConfigError(f"unknown coreset method {method!r}; valid: 'pruned', 'dense'")


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
    n, dim = z.shape
    dev = z.device
    k = n_clusters or max(1, min(n // block, int(4 * math.sqrt(n))))
    assign = kmeans_assign(z, k, seed)
    order = torch.argsort(assign, stable=True)  # rows grouped by cluster
    counts = torch.bincount(assign, minlength=k)
    counts = counts[counts > 0]
    # Cut every cluster into groups of at most `block` rows and pad each group to `block` by repeating
    # its last row: a padded copy has exactly its original's distances, so it never changes a max.
    rows: list[torch.Tensor] = []
    for cluster_rows in torch.split(order, counts.tolist()):
        for grp in torch.split(cluster_rows, block):
            if grp.numel() < block:
                grp = torch.cat([grp, grp[-1:].expand(block - grp.numel())])
            rows.append(grp)
    table = torch.stack(rows)  # (G, block) original row index of each slot
    g_count = table.shape[0]
    zp = z[table.reshape(-1)].reshape(g_count, block, dim)  # (G, block, d)
    mu = zp.mean(1)  # (G, d); duplicates shift the centre, the radius below stays exact for it
    radius = (zp - mu[:, None, :]).norm(dim=2).amax(1) * (1 + 1e-5) + 1e-6  # slack for rounding
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
