"""benchmarks/backbone.py: the four graphs it times compute the same features."""

from __future__ import annotations

import pytest
from bench_scripts import load_benchmark

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def test_variants_agree_and_time(tmp_path):
    bench = load_benchmark("backbone.py")
    model = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2)).eval()
    with torch.no_grad():  # non-trivial running statistics, so that folding changes the weights
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    graphs = bench.variants(model)
    assert list(graphs) == ["timm", "channels_last", "folded", "folded+channels_last (default)"]
    _, ref = bench.time_forward(model, x, repeats=1)
    for module, channels_last in graphs.values():
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        times, feats = bench.time_forward(module, xin, repeats=2)
        assert len(times) == 2 and all(t > 0 for t in times)
        for f, r in zip(feats, ref):
            torch.testing.assert_close(f, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
