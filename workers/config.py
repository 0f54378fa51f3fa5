"""Model configuration: frozen schema dataclasses (patchaudit.schema), validated when they are made.

Every field says its default, its meaning and the rules its value obeys; `configs/default.yaml` is
generated from them (`make configs`). `from_dict` (the schema's) builds them from YAML mappings:
unknown keys are errors that list the allowed ones, bad values name their dotted path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from patchaudit.schema import Schema, from_dict, opt
from patchaudit.workers.registry import method_names

__all__ = [
    "METHODS", "CalibrationConfig", "GaussianConfig", "ModelConfig", "PadimConfig", "PatchCoreConfig",
    "from_dict", "model_config_from_dict",
]

METHODS = method_names()  # the registry is the one list of methods


@dataclass(frozen=True)
class PatchCoreConfig(Schema):
    schema_path: ClassVar[str] = "model.patchcore."

    patch_size: int = opt(3, "neighbourhood (patches, odd) aggregated around each patch", ge=1, odd=True)
    feature_dim: int | None = opt(
        None, "average-pool the concatenated embedding down to this many channels; null keeps all", ge=1)
    coreset_ratio: float = opt(0.1, "share of the training patches kept in the memory bank", gt=0, le=1)
    coreset_projection_dim: int | None = opt(
        128, "random projection used to select the coreset; null selects on the full features", ge=1)
    coreset_method: str = opt(
        "batched", "greedy k-center selection: batched and pruned are exact and fast, dense is the textbook "
        "loop (all three select the same)", choices=("batched", "pruned", "dense"))
    score: str = opt("max", "image score: the largest patch score, or the paper's reweighting (eq. 7)",
                     choices=("max", "reweighted"))
    reweight_neighbors: int = opt(3, "b, the bank neighbours the reweighting looks at", ge=1)
    shards: int = opt(1, "split the bank into this many shards (one index-shard actor each when distributed)",
                      ge=1)
    index: str = opt("flat", "bank index: flat is exact; hnsw and ivf are approximate (measure recall first)",
                     choices=("flat", "hnsw", "ivf"))
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
class CalibrationConfig(Schema):
    schema_path: ClassVar[str] = "model.calibration."

    holdout: float = opt(0.1, "share of the defect-free training images kept out of the fit to set the threshold",
                         gt=0, lt=1)
    quantile: float = opt(0.99, "threshold = this quantile of the held-out images' scores ...", gt=0, le=1)
    margin: float = opt(1.0, "... times this factor", gt=0)


@dataclass(frozen=True)
class ModelConfig(Schema):
    schema_path: ClassVar[str] = "model."

    method: str = opt("patchcore", "anomaly-detection method", choices=METHODS)
    backbone: str = opt("tf_efficientnet_lite0", "timm feature extractor")
    weights: str | None = opt(
        None, "a local weights file; null: the offline pip package of the backbone, else the timm hub")
    layers: tuple[int, ...] = opt((2, 3), "feature levels (timm out_indices) the method uses", min_len=1)
    image_size: tuple[int, int] = opt((256, 256), "[height, width] every image is resized to", ge=32)
    center_crop: tuple[int, int] | None = opt(
        None, "[height, width] cut from the centre after resizing; null: none (a crop hides defects at the border)",
        ge=32)
    jpeg_draft: bool = opt(
        False, "decode JPEGs at 1/2, 1/4 or 1/8 scale in libjpeg when the image stays at least image_size, "
        "then resize: several times faster on large photos, slightly different pixels (no effect on images "
        "smaller than twice image_size)")
    map_sigma: float = opt(4.0, "Gaussian blur (pixels) of the anomaly map before the image score and heatmap",
                           ge=0)
    batch_size: int = opt(16, "images per forward pass", ge=1)
    seed: int = opt(0, "seed of the calibration hold-out split, the coreset projection and PaDiM's channel subset")
    device: str = opt("auto", "auto (a GPU if there is one) | cpu | cuda | cuda:N")
    patchcore: PatchCoreConfig = opt(PatchCoreConfig, "PatchCore's options")
    padim: PadimConfig = opt(PadimConfig, "PaDiM's options")
    gaussian: GaussianConfig = opt(GaussianConfig, "Gaussian AD's options")
    calibration: CalibrationConfig = opt(CalibrationConfig, "how the anomaly threshold is set")

    def check(self, prefix: str) -> None:
        crop = self.center_crop
        # the crop is what the backbone sees, so it has image_size's lower bound (checked per value)
        if crop is not None and any(c > s for c, s in zip(crop, self.image_size)):
            self.fail(f"{prefix}center_crop must be [height, width] between 32 and image_size "
                      f"{list(self.image_size)}, got {list(crop)}")


def model_config_from_dict(data: Any) -> ModelConfig:
    return from_dict(ModelConfig, data, "model")
