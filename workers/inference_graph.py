"""The inference graph of a backbone: batch norms folded into their convolutions, channels-last memory.

A fitted model never trains its backbone, so every eval-mode batch norm is a fixed per-channel affine
map that can move into the convolution before it. `load_backbone` applies `optimize_for_inference` by
default; the result is checked against the original before it is used (benchmarks/backbone.py).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# An optimised model must reproduce the original's features to this relative error (float32
# rounding of the folded weights is ~1e-6); anything larger means a batch norm was paired wrongly.
FOLD_TOLERANCE = 1e-4


def fold_batchnorms(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d into the convolution registered right before it; returns how many.

    timm registers each convolution immediately before the norm that follows it in the data flow
    (conv_stem/bn1, conv_dw/bn2, conv_pwl/bn3, conv1/bn1, ...). The norm's affine map moves into the
    convolution's weight and bias; a timm BatchNormAct2d keeps its drop/activation as a Sequential.
    This pairing is a convention, not a guarantee: `optimize_for_inference` checks the result.
    """
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            # exact types: subclasses (frozen, sync, other timm norm-acts) may compute something else
            if not (isinstance(conv, nn.Conv2d) and type(bn).__name__ in ("BatchNorm2d", "BatchNormAct2d")):
                continue
            if bn.num_features != conv.out_channels or not bn.track_running_stats or bn.running_var is None:
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.affine:
                    scale = scale * bn.weight
                shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
                conv.bias = nn.Parameter(shift.clone(), requires_grad=False)
            tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*tail) if tail else nn.Identity())
            folded += 1
    return folded


def optimize_for_inference(model: nn.Module, name: str = "") -> tuple[nn.Module, int]:
    """(optimised copy, number of folded norms); (model in channels-last, 0) if folding misbehaves, and
    the model untouched if it cannot run the small check input at all.

    Batch norms folded into the convolutions and channels-last memory make a CPU forward pass of the
    efficientnet-lite / mobilenet backbones 2.1-3.3x faster (benchmarks/backbone.py); the features
    agree with the original to float32 rounding. The copy is checked against the original on a
    random input before it is used.
    """
    model = model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            want = model(x)
    except Exception as exc:  # e.g. a transformer built for one input size: nothing to check against
        log.warning(
            "%s: left unoptimised, the 64x64 check input fails (%s: %s)",
            name or type(model).__name__,
            type(exc).__name__,
            exc,
        )
        return model, 0
    fast = copy.deepcopy(model)
    folded = fold_batchnorms(fast)
    fast = fast.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        got = fast(x.contiguous(memory_format=torch.channels_last))
    err = max(float((g - w).abs().max() / w.abs().max().clamp(min=1e-12)) for g, w in zip(got, want))
    if err <= FOLD_TOLERANCE:
        return fast, folded
    log.warning(
        "%s: folding %d batch norms changed the features by %.2g (relative); using the unfolded model",
        name or type(model).__name__,
        folded,
        err,
    )
    return model.to(memory_format=torch.channels_last), 0
