"""benchmarks/anomalib_reference.py without anomalib: our offline weights load into a timm
features_only extractor (what anomalib's TimmFeatureExtractor wraps) completely and exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from bench_scripts import load_benchmark

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("anomalib_reference.py")


def _anomalib_like(name: str, layers: list[str]):
    """A stand-in for anomalib's Patchcore: .model.feature_extractor.feature_extractor is timm's model."""
    probe = timm.create_model(name, pretrained=False, features_only=True)
    modules = [info["module"] for info in probe.feature_info.info]
    extractor = timm.create_model(
        name, pretrained=False, features_only=True, out_indices=[modules.index(m) for m in layers]
    )
    return SimpleNamespace(model=SimpleNamespace(feature_extractor=SimpleNamespace(feature_extractor=extractor)))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenetv2_100"])
def test_offline_weights_fill_the_extractor(bench, name):
    from patchaudit.workers.weights_offline import find_offline_weights, load_offline_state_dict

    path = find_offline_weights(name)
    if path is None:
        pytest.skip(f"offline weights for {name} not installed")
    model = _anomalib_like(name, bench.LAYERS[name])
    assert bench.load_offline_weights(model, name) == str(path)
    extractor = model.model.feature_extractor.feature_extractor
    sd = load_offline_state_dict(name, path)
    for key, value in extractor.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # the two layers are our default stride-8 and stride-16 stages
    assert extractor.feature_info.reduction() == [8, 16]


def test_speed_row_and_cpu_clock(bench):
    row = bench.speed_row(83, 10.0, 41.5)
    assert row == {"test_s": 10.0, "images_per_s": 8.3, "cpu_s": 41.5, "cpu_ms_per_image": 500.0}
    out, wall, cpu = bench.timed(lambda: sum(i * i for i in range(200_000)))
    assert out > 0 and wall > 0 and cpu >= 0
