"""Model configuration: frozen schema dataclasses (patchaudit.schema), validated when they are made.

Every field says its default, its meaning and the rules its value obeys; `configs/default.yaml` is
generated from them (`make configs`). `from_dict` (the schema's) builds them from YAML mappings:
unknown keys are errors that list the allowed ones, bad values name their dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from patchaudit.errors import ConfigError
from patchaudit.schema import Schema, from_dict, opt
from patchaudit.workers.registry import method_names

__all__ = [
    "METHODS",
    "CalibrationConfig",
    "GaussianConfig",
    "ModelConfig",
    "PadimConfig",
    "PatchCoreConfig",
    "SimpleNetConfig",
    "from_dict",
    "model_config_from_dict",
]

METHODS = method_names()  # the registry is the one list of methods
GEOMETRIES = ("squash", "aspect", "tile")  # how an image of any shape becomes backbone input (workers/geometry.py)


@dataclass(frozen=True)
class PatchCoreConfig(Schema):
    schema_path: ClassVar[str] = "model.patchcore."

    patch_size: int = opt(3, "neighbourhood (patches, odd) aggregated around each patch", ge=1, odd=True)
    feature_dim: int | None = opt(
        None, "average-pool the concatenated embedding down to this many channels; null keeps all", ge=1
    )
    coreset_ratio: float = opt(0.1, "share of the training patches kept in the memory bank", gt=0, le=1)
    coreset_projection_dim: int | None = opt(
        128, "random projection used to select the coreset; null selects on the full features", ge=1
    )
    coreset_method: str = opt(
        "batched",
        "greedy k-center selection: batched and pruned are exact and fast, dense is the textbook "
        "loop (all three select the same)",
        choices=("batched", "pruned", "dense"),
    )
    score: str = opt(
        "max", "image score: the largest patch score, or the paper's reweighting (eq. 7)", choices=("max", "reweighted")
    )
    reweight_neighbors: int = opt(3, "b, the bank neighbours the reweighting looks at", ge=1)
    shards: int = opt(1, "split the bank into this many shards (one index-shard actor each when distributed)", ge=1)
    index: str = opt(
        "flat",
        "bank index: flat is exact; hnsw and ivf are approximate (measure recall first)",
        choices=("flat", "hnsw", "ivf"),
    )
    hnsw_ef_search: int = opt(128, "hnsw: candidates searched per query (higher: better recall, slower)", ge=1)
    ivf_nprobe: int = opt(16, "ivf: clusters searched per query (higher: better recall, slower)", ge=1)


@dataclass(frozen=True)
class PadimConfig(Schema):
    schema_path: ClassVar[str] = "model.padim."

    n_features: int = opt(100, "d, the random subset of channels modelled per position", ge=1)
    eps: float = opt(0.01, "regulariser added to each position's covariance diagonal (the paper's 0.01)", ge=0)


@dataclass(frozen=True)
class GaussianConfig(Schema):
    schema_path: ClassVar[str] = "model.gaussian."

    eps: float = opt(1e-6, "regulariser added to each level's (Ledoit-Wolf shrunk) covariance diagonal", ge=0)


@dataclass(frozen=True)
class SimpleNetConfig(Schema):
    schema_path: ClassVar[str] = "model.simplenet."

    patch_size: int = opt(
        3, "neighbourhood (patches, odd) aggregated around each patch, as PatchCore's", ge=1, odd=True
    )
    noise_std: float = opt(
        0.1,
        "std of the Gaussian noise that makes synthetic anomalous features, in units of the feature "
        "scale (feature_scale) over the training patches",
        gt=0,
    )
    feature_scale: str = opt(
        "global",
        "how patch features are standardised before the adaptor: global = minus the channel means, divided "
        "by one scale for all channels (the root mean square of the channel stds), so the noise is isotropic "
        "in the backbone's own feature geometry as in the paper; channel = each channel by its own std",
        choices=("global", "channel"),
    )
    hidden: int = opt(1024, "hidden units of the discriminator (the paper's 1024)", ge=1)
    steps: int = opt(1000, "training steps (a fixed schedule: no early stopping)", ge=1)
    batch_patches: int = opt(2048, "random training patches per step (each also gives one noisy copy)", ge=1)
    lr_adaptor: float = opt(1e-4, "Adam learning rate of the feature adaptor", gt=0)
    lr_discriminator: float = opt(2e-4, "Adam learning rate of the discriminator", gt=0)
    margin: float = opt(0.5, "truncated L1 margin: normal above +margin, noisy below -margin", gt=0)
    train_threads: int = opt(
        1,
        "CPU threads while training the small networks (0: torch's default); their small matrix products "
        "gain little from threads and lose much when other processes share the cores",
        ge=0,
    )


@dataclass(frozen=True)
class CalibrationConfig(Schema):
    schema_path: ClassVar[str] = "model.calibration."

    target_fpr: float = opt(
        0.01,
        "share of good images the threshold may flag (false-positive rate); the threshold is the "
        "(1 - target_fpr) order statistic of out-of-sample scores of every training image",
        gt=0,
        lt=1,
    )
    folds: int = opt(
        5,
        "k-fold cross-fitting: each fold of the training images is scored by a model fitted on the other "
        "folds; the final model is fitted on all",
        ge=2,
    )
    margin: float = opt(1.0, "the threshold is multiplied by this factor", gt=0)
    concurrent_fits: int = opt(
        0,
        "fold models (and the final model) fitted at once, in threads; 0: as many as the CPU cores allow "
        "when the method's fit is single-threaded (SimpleNet's train_threads), else 1; memory grows with it",
        ge=0,
    )


def upgrade_calibration(data: Any, fitted: bool = False) -> Any:
    """Map the keys of older configs: `quantile: q` means `target_fpr: 1 - q`; a fitted model without
    `resize` was fitted with Pillow's.

    `holdout` (the share of training images once kept out of the fit) has no meaning any more: in
    a user's config it is an error that says so; in a fitted model's manifest (`fitted`) it is
    dropped, since the model's threshold was already set.
    """
    if fitted and isinstance(data, dict) and "resize" not in data:
        data = {**data, "resize": "pillow"}  # fitted before `resize` existed: Pillow resized its images
    if not isinstance(data, dict) or not isinstance(data.get("calibration"), dict):
        return data
    cal = dict(data["calibration"])
    if "quantile" in cal:
        if "target_fpr" in cal:
            raise ConfigError("model.calibration: give target_fpr only (quantile is its old form, 1 - target_fpr)")
        q = cal.pop("quantile")
        if isinstance(q, bool) or not isinstance(q, (int, float)):
            raise ConfigError(f"model.calibration.quantile must be a number, got {q!r}")
        if fitted and q >= 1.0:
            q = 1.0 - 1e-9
        cal["target_fpr"] = 1.0 - float(q)
    if "holdout" in cal:
        if not fitted:
            raise ConfigError(
                "model.calibration.holdout was removed: every defect-free training image now calibrates the "
                "threshold by k-fold cross-fitting; set model.calibration.folds (default 5) and target_fpr instead"
            )
        cal.pop("holdout")
    return {**data, "calibration": cal}


@dataclass(frozen=True)
class ModelConfig(Schema):
    schema_path: ClassVar[str] = "model."

    method: str = opt("patchcore", "anomaly-detection method", choices=METHODS)
    backbone: str = opt("tf_efficientnet_lite0", "timm feature extractor")
    weights: str | None = opt(
        None, "a local weights file; null: the offline pip package of the backbone, else the timm hub"
    )
    layers: tuple[int, ...] = opt((2, 3), "feature levels (timm out_indices) the method uses", min_len=1)
    image_size: tuple[int, int] = opt(
        (256, 256), "[height, width] every image is resized to (geometry squash); with aspect, [S, S]", ge=32
    )
    center_crop: tuple[int, int] | None = opt(
        None,
        "[height, width] cut from the centre after resizing; null: none (a crop hides defects at the border)",
        ge=32,
    )
    geometry: str = opt(
        "squash",
        "how an image of any shape becomes backbone input. squash: resized to image_size whatever its "
        "shape (non-square images are distorted). aspect: the aspect ratio kept: the short side (or long, "
        "aspect_side) becomes image_size's side S, the other is rounded to the backbone stride; images of "
        "different shapes run as one backbone pass per shape. tile: the image scaled by tile_scale and cut "
        "into overlapping tile_size tiles, each scored against the same model, patch maps stitched with "
        "overlaps averaged, the image score taken from the stitched map (large frames whose defects vanish "
        "at 256 px)",
        choices=GEOMETRIES,
    )
    aspect_side: str = opt("short", "geometry aspect: the side of each image that becomes S", choices=("short", "long"))
    tile_size: int = opt(256, "geometry tile: side of the square tiles in px, a multiple of 32", ge=32)
    tile_overlap: float = opt(0.25, "geometry tile: share of a tile shared with its neighbour", ge=0, le=0.9)
    tile_scale: float = opt(
        1.0,
        "geometry tile: resize factor before tiling (1 = original pixels); an image smaller than one "
        "tile is enlarged until its short side fills a tile",
        gt=0,
        le=8,
    )
    jpeg_draft: bool = opt(
        False,
        "decode JPEGs at 1/2, 1/4 or 1/8 scale in libjpeg when the image stays at least image_size, "
        "then resize: several times faster on large photos, slightly different pixels (no effect on images "
        "smaller than twice image_size)",
    )
    resize: str = opt(
        "pillow",
        "who resizes images to the backbone input, both antialiased bilinear: pillow (Pillow's resize) or "
        "torch (its vectorized uint8 kernel, several times faster; values differ from Pillow's by at most 1 "
        "level, on a few in ten thousand). Models fitted before this option existed keep pillow",
        choices=("pillow", "torch"),
    )
    gpu_jpeg: bool = opt(
        True,
        "on a GPU, decode JPEGs there in batches (nvJPEG), each failure again on the CPU; its pixels "
        "differ from the CPU decoder's by a few levels, so scores differ slightly from a CPU run",
    )
    map_sigma: float = opt(4.0, "Gaussian blur (pixels) of the anomaly map before the image score and heatmap", ge=0)
    batch_size: int = opt(16, "images per forward pass", ge=1)
    seed: int = opt(0, "seed of the calibration folds, the coreset projection and PaDiM's channel subset")
    precision: str = opt(
        "fp32",
        "fp32 | bf16 | fp16: the backbone under autocast in that type and the exact k-NN's distance "
        "matmul in it, with the best `knn_refine` candidates re-ranked by exact fp32 distances (scores then "
        "differ from fp32 only where the true nearest neighbour is not among them). fp16 is for GPUs (on CPU it "
        "is many times slower); bf16 needs an Ampere+ GPU, or AVX512-BF16/AMX on CPU, to pay at all; faiss "
        "backends ignore it",
        choices=("fp32", "bf16", "fp16"),
    )
    knn_refine: int = opt(8, "reduced precision: candidates per patch re-ranked exactly in fp32", ge=1)
    device: str = opt("auto", "auto (a GPU if there is one) | cpu | cuda | cuda:N")
    patchcore: PatchCoreConfig = opt(PatchCoreConfig, "PatchCore's options")
    padim: PadimConfig = opt(PadimConfig, "PaDiM's options")
    gaussian: GaussianConfig = opt(GaussianConfig, "Gaussian AD's options")
    simplenet: SimpleNetConfig = opt(SimpleNetConfig, "SimpleNet's options")
    calibration: CalibrationConfig = opt(CalibrationConfig, "how the anomaly threshold is set")

    def check(self, prefix: str) -> None:
        crop = self.center_crop
        # the crop is what the backbone sees, so it has image_size's lower bound (checked per value)
        if crop is not None and any(c > s for c, s in zip(crop, self.image_size)):
            self.fail(
                f"{prefix}center_crop must be [height, width] between 32 and image_size "
                f"{list(self.image_size)}, got {list(crop)}"
            )
        if self.geometry != "squash" and crop is not None:
            self.fail(
                f"{prefix}center_crop works only with geometry squash, not {self.geometry!r}; set center_crop: null"
            )
        if self.geometry == "aspect" and self.image_size[0] != self.image_size[1]:
            self.fail(
                f"{prefix}image_size must be square [S, S] with geometry aspect (the {self.aspect_side} "
                f"side of each image becomes S), got {list(self.image_size)}"
            )
        if self.tile_size % 32:
            self.fail(f"{prefix}tile_size must be a multiple of 32 (the deepest backbone stride), got {self.tile_size}")
        if self.geometry == "tile" and self.method == "patchcore" and self.patchcore.score == "reweighted":
            self.fail(
                f"{prefix}patchcore.score reweighted needs one patch grid per image; with geometry tile "
                "the image score is the maximum of the stitched map: use score: max"
            )


def model_config_from_dict(data: Any, fitted: bool = False) -> ModelConfig:
    """A validated ModelConfig; `fitted`: the config comes from a fitted model's manifest (see upgrade_calibration)."""
    return from_dict(ModelConfig, upgrade_calibration(data, fitted), "model")
