"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and Localization",
CVPR 2023).

Features: the frozen backbone's local features exactly as PatchCore builds them (same levels, the same
neighbourhood aggregation, `patchcore_embed`), centred with the training means and divided by one scale
for all channels (`feature_scale: global`; `channel`: by each channel's std).
Fit: a feature adaptor (one linear layer) and a discriminator (linear - batch norm - leaky ReLU -
linear) are trained together: adapted normal patch features should score above +margin, the same
features plus Gaussian noise (the synthetic anomalies) below -margin, with the paper's truncated L1
loss. The schedule is fixed (`steps` minibatches of random training patches): nothing is chosen on
test images, and there is no early stopping. Score: a patch's score is minus the discriminator's
output; the map is those scores on the patch grid (upsampled and blurred by the shared map code), the
image score the maximum of the blurred map (as PaDiM's).

The backbone runs once per training image (features are embedded before fitting, then the small
networks train on tensors), so the CPU path is practical; on a GPU everything runs there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from patchaudit.errors import ArtifactError
from patchaudit.store.artifacts import arrays_from_files, arrays_to_files
from patchaudit.store.objects import ObjectStore
from patchaudit.workers.features import flatten_patches, patchcore_embed
from patchaudit.workers.maps import smooth_maps
from patchaudit.workers.model import AnomalyModel, ScoredBatch
from patchaudit.workers.registry import register

# fold models may train in threads at once (cross-fitting): their seeded initialisations must not interleave
_INIT_LOCK = threading.Lock()


class SimpleNetHead(nn.Module):
    """Feature adaptor + discriminator on standardised patch features (N, D) -> (N,) normality logits."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.adaptor = nn.Linear(dim, dim)
        self.discriminator = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1)
        )
        for m in self.discriminator:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)  # as the authors' code

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # adapted features -> (N,)
        return self.discriminator(z).squeeze(1)


def truncated_l1(normal: torch.Tensor, anomalous: torch.Tensor, margin: float) -> torch.Tensor:
    """The paper's loss (eq. 5): max(0, m - D(q)) + max(0, m + D(q-)), averaged over each set."""
    return torch.clamp(margin - normal, min=0).mean() + torch.clamp(margin + anomalous, min=0).mean()


def feature_scale(feats: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std), each (D,), that standardise training features (N, D) as (feats - mean) / std.

    global: one scale for every channel, the root mean square of the channel stds, so distances keep
    the backbone's own geometry (the one PatchCore's nearest-neighbour distances use) and isotropic noise
    is isotropic there, as in the paper, which adds noise to the unstandardised features; channel: each
    channel by its own std, which weights a low-variance channel as much as a high-variance one.
    """
    mean, std = feats.mean(0), feats.std(0)
    if how == "global":
        std = std.pow(2).mean().sqrt().expand_as(std).clone()
    elif how != "channel":
        raise ValueError(f"feature_scale must be 'global' or 'channel', got {how!r}")
    return mean, std.clamp(min=1e-6)


def train_head(
    feats: torch.Tensor,
    hidden: int,
    noise_std: float,
    steps: int,
    batch: int,
    lr_adaptor: float,
    lr_discriminator: float,
    margin: float,
    seed: int,
) -> tuple[SimpleNetHead, list[float]]:
    """Train adaptor + discriminator on standardised normal features (N, D) for a fixed number of steps.

    Returns the head (in eval mode) and the loss of every 50th step (the training record)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dev = feats.device
    with _INIT_LOCK:  # layer initialisation draws from the global generator: one seeded draw at a time
        torch.manual_seed(seed)
        head = SimpleNetHead(feats.shape[1], hidden).to(dev)
    opt = torch.optim.Adam(
        [
            {"params": head.adaptor.parameters(), "lr": lr_adaptor},
            {"params": head.discriminator.parameters(), "lr": lr_discriminator, "weight_decay": 1e-5},
        ]
    )
    losses: list[float] = []
    head.train()
    n = feats.shape[0]
    for step in range(steps):  # noqa: B007 (step is used for the record)
        idx = torch.randint(n, (min(batch, n),), generator=gen).to(dev)
        z = head.adaptor(feats[idx])  # (b, D)
        noise = torch.randn(z.shape, generator=gen).to(dev) * noise_std
        out = head(torch.cat([z, z + noise]))  # (2b,)
        loss = truncated_l1(out[: z.shape[0]], out[z.shape[0] :], margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
    head.eval()
    return head, losses


@register("simplenet")
class SimpleNetModel(AnomalyModel):
    """SimpleNet: adaptor + discriminator on PatchCore's patch features; map = -discriminator output."""

    def __init__(self, config, backbone) -> None:
        super().__init__(config, backbone)
        self.head: SimpleNetHead | None = None
        self.mean: torch.Tensor | None = None  # (D,) statistics of the training features (feature_scale)
        self.std: torch.Tensor | None = None
        self.fit_timings: dict[str, Any] = {}

    @property
    def sn(self):
        return self.config.simplenet

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, h, w) patch features, exactly as PatchCore builds them."""
        return patchcore_embed(self.backbone.extract(x), self.sn.patch_size, None)

    def fit_embedded(self, embeddings: Iterable[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        chunks = [flatten_patches(e).float() for e in embeddings]  # [(B*h*w, D), ...]
        if not chunks:
            raise ArtifactError("no training images could be decoded: nothing to fit")
        sn = self.sn
        # the fit is called under inference mode (features); training needs autograd on normal tensors
        with torch.inference_mode(False), torch.enable_grad():
            feats = torch.cat(chunks).to(self.device).clone()  # (N, D)
            mean, std = feature_scale(feats, sn.feature_scale)
            feats = (feats - mean) / std
            threads = torch.get_num_threads()
            if sn.train_threads and self.device.type == "cpu":
                torch.set_num_threads(sn.train_threads)
            try:
                head, losses = train_head(
                    feats,
                    sn.hidden,
                    sn.noise_std,
                    sn.steps,
                    sn.batch_patches,
                    sn.lr_adaptor,
                    sn.lr_discriminator,
                    sn.margin,
                    self.config.seed,
                )
            finally:
                torch.set_num_threads(threads)
            del feats
        self.head, self.mean, self.std = head, mean.detach(), std.detach()
        self.fit_timings = {
            "train_s": time.perf_counter() - t0,
            "patches": sum(c.shape[0] for c in chunks),
            "train_loss_first": losses[0],
            "train_loss_last": losses[-1],
        }

    def fit_threads(self) -> int | None:
        n = self.sn.train_threads
        return n if n and self.device.type == "cpu" else None

    def patch_scores(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w) patch anomaly scores (minus the discriminator output)."""
        if self.head is None or self.mean is None or self.std is None:
            raise ArtifactError("SimpleNet model is not fitted")
        b, _, h, w = emb.shape
        q = (flatten_patches(emb).float() - self.mean) / self.std
        with torch.no_grad():
            out = self.head(self.head.adaptor(q))
        return (-out).view(b, h, w)

    def score_embeddings(self, emb: torch.Tensor, index: Any = None) -> ScoredBatch:
        grid = self.patch_scores(emb)
        cell = min(self.backbone.reductions)  # input pixels per patch cell
        smooth = smooth_maps(grid, (grid.shape[1] * cell, grid.shape[2] * cell), self.config.map_sigma)
        return ScoredBatch(smooth.flatten(1).amax(1).double().cpu().numpy(), grid)

    def map_image_score(self, grid: torch.Tensor, smooth: torch.Tensor) -> float:
        return float(smooth.max())  # as for one untiled image: the maximum of the smoothed map

    # -- artifacts -----------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        if self.head is None or self.mean is None or self.std is None:
            raise ArtifactError("SimpleNet model is not fitted")
        arrays = {f"head.{k}": v.detach().cpu().numpy() for k, v in self.head.state_dict().items()}
        arrays["feature_mean"] = self.mean.cpu().numpy()
        arrays["feature_std"] = self.std.cpu().numpy()
        names, files = arrays_to_files(arrays, "simplenet_")
        return {"arrays": names, "feature_dim": int(self.mean.numel()), "hidden": self.sn.hidden}, files

    def load_state(self, manifest: dict[str, Any], store: ObjectStore, **_: Any) -> None:
        arrays = arrays_from_files(store, manifest, manifest["arrays"], "simplenet_")
        try:
            dim, hidden = int(manifest["feature_dim"]), int(manifest["hidden"])
            head = SimpleNetHead(dim, hidden)
            head.load_state_dict(
                {k[len("head.") :]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith("head.")}
            )
            self.mean = torch.from_numpy(arrays["feature_mean"]).to(self.device)
            self.std = torch.from_numpy(arrays["feature_std"]).to(self.device)
        except (KeyError, RuntimeError) as exc:
            raise ArtifactError(f"SimpleNet model files do not match their manifest: {exc}") from None
        self.head = head.to(self.device).eval()
