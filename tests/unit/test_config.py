"""Tests for workers.config: the dict/YAML validator, its error messages, and ModelConfig's value checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from patchaudit.errors import ConfigError
from patchaudit.workers.config import (
    METHODS,
    CalibrationConfig,
    ModelConfig,
    PatchCoreConfig,
    from_dict,
    model_config_from_dict,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_error(data) -> str:
    with pytest.raises(ConfigError) as info:
        model_config_from_dict(data)
    return str(info.value)


# --------------------------------------------------------------------------- defaults


@pytest.mark.parametrize("data", [None, {}])
def test_defaults_validate(data):
    cfg = model_config_from_dict(data)
    assert cfg == ModelConfig()
    assert cfg.method == "patchcore" and cfg.center_crop is None  # honest protocol: no crop by default
    assert cfg.patchcore == PatchCoreConfig() and cfg.calibration == CalibrationConfig()
    assert ModelConfig().validate() == ModelConfig()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().batch_size = 3  # type: ignore[misc]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_yaml_model_sections_validate(name):
    data = yaml.safe_load((CONFIGS / name).read_text())
    cfg = model_config_from_dict(data.get("model"))
    assert cfg.method in METHODS


def test_yaml_round_trip():
    text = """
    method: padim
    layers: [1, 2, 3]
    image_size: [224, 320]
    center_crop: [200, 300]
    map_sigma: 2        # an int where a float is expected is fine
    padim: {n_features: 50}
    """
    cfg = model_config_from_dict(yaml.safe_load(text))
    assert cfg.method == "padim" and cfg.layers == (1, 2, 3)
    assert cfg.image_size == (224, 320) and cfg.center_crop == (200, 300)  # lists become tuples
    assert cfg.map_sigma == 2.0 and isinstance(cfg.map_sigma, float)
    assert cfg.padim.n_features == 50 and cfg.padim.eps == 0.01  # unset nested keys keep defaults
    hash(cfg)  # frozen and hashable all the way down


# --------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    msg = config_error({"batchsize": 8})
    assert "model.batchsize" in msg
    for allowed in ("method", "backbone", "batch_size", "patchcore", "calibration"):
        assert allowed in msg


def test_unknown_nested_key_names_dotted_path_and_allowed_keys():
    msg = config_error({"patchcore": {"bogus": 1}})
    assert "model.patchcore.bogus" in msg
    for allowed in ("patch_size", "coreset_ratio", "index", "ivf_nprobe"):
        assert allowed in msg
    assert "model.calibration.quantil" in config_error({"calibration": {"quantil": 0.9}})


def test_several_unknown_keys_all_named():
    msg = config_error({"zeta": 1, "alpha": 2, "method": "patchcore"})
    assert "model.alpha" in msg and "model.zeta" in msg


def test_unknown_keys_of_mixed_types():
    # YAML turns `on:` into True and `1:` into 1; mixed key types must not crash the message.
    msg = config_error(yaml.safe_load("on: 1\n1: 2\nfoo: 3\n"))
    assert "unknown" in msg and "foo" in msg


@pytest.mark.parametrize(("data", "path"), [("patchcore", "model"), ({"patchcore": [1, 2]}, "model.patchcore")])
def test_section_must_be_a_mapping(data, path):
    assert f"{path} must be a mapping" in config_error(data)


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"batch_size": "16"}, "model.batch_size must be an integer"),
        ({"batch_size": True}, "model.batch_size must be an integer"),  # bool is an int in Python, not here
        ({"batch_size": 16.0}, "model.batch_size must be an integer"),
        ({"patchcore": {"shards": False}}, "model.patchcore.shards must be an integer"),
        ({"patchcore": {"feature_dim": "64"}}, "model.patchcore.feature_dim must be an integer"),
        ({"map_sigma": "4"}, "model.map_sigma must be a number"),
        ({"map_sigma": True}, "model.map_sigma must be a number"),
        ({"backbone": 50}, "model.backbone must be a string"),
        ({"weights": ["a.pth"]}, "model.weights must be a string"),
        ({"image_size": 256}, "model.image_size must be a list"),
        ({"image_size": [256]}, "model.image_size must be a list of 2 values"),
        ({"image_size": [256, 256, 3]}, "model.image_size must be a list of 2 values"),
        ({"image_size": [256, "256"]}, "model.image_size[1] must be an integer"),
        ({"center_crop": [224]}, "model.center_crop must be a list of 2 values"),
        ({"layers": [2, 3.5]}, "model.layers[1] must be an integer"),
        ({"layers": "2,3"}, "model.layers must be a list"),
    ],
)
def test_wrong_types(data, expected):
    assert expected in config_error(data)


def test_optional_values_accept_null():
    cfg = model_config_from_dict({"weights": None, "center_crop": None, "patchcore": {"feature_dim": None}})
    assert cfg.weights is None and cfg.center_crop is None and cfg.patchcore.feature_dim is None
    cfg = model_config_from_dict({"patchcore": {"feature_dim": 512, "coreset_projection_dim": None}})
    assert cfg.patchcore.feature_dim == 512 and cfg.patchcore.coreset_projection_dim is None


# --------------------------------------------------------------------------- choices and ranges


@pytest.mark.parametrize(
    ("data", "path", "valid"),
    [
        ({"method": "fastflow"}, "model.method", ("patchcore", "padim", "gaussian")),
        ({"patchcore": {"index": "annoy"}}, "model.patchcore.index", ("flat", "hnsw", "ivf")),
        ({"patchcore": {"score": "mean"}}, "model.patchcore.score", ("max", "reweighted")),
        ({"patchcore": {"coreset_method": "random"}}, "model.patchcore.coreset_method", ("batched", "pruned", "dense")),
    ],
)
def test_choices_list_valid_values(data, path, valid):
    msg = config_error(data)
    assert path in msg
    for v in valid:
        assert v in msg


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"patchcore": {"coreset_ratio": 0.0}}, "model.patchcore.coreset_ratio"),
        ({"patchcore": {"coreset_ratio": 1.5}}, "model.patchcore.coreset_ratio"),
        ({"patchcore": {"patch_size": 2}}, "model.patchcore.patch_size"),
        ({"patchcore": {"patch_size": 0}}, "model.patchcore.patch_size"),
        ({"patchcore": {"shards": 0}}, "model.patchcore.shards"),
        ({"patchcore": {"reweight_neighbors": 0}}, "model.patchcore.reweight_neighbors"),
        ({"patchcore": {"hnsw_ef_search": 0}}, "model.patchcore.hnsw_ef_search"),
        ({"patchcore": {"ivf_nprobe": -1}}, "model.patchcore.ivf_nprobe"),
        ({"patchcore": {"feature_dim": 0}}, "model.patchcore.feature_dim"),
        ({"patchcore": {"coreset_projection_dim": 0}}, "model.patchcore.coreset_projection_dim"),
        ({"padim": {"n_features": 0}}, "model.padim.n_features"),
        ({"padim": {"eps": -0.1}}, "model.padim.eps"),
        ({"gaussian": {"eps": -1e-9}}, "model.gaussian.eps"),
        ({"calibration": {"target_fpr": 0.0}}, "model.calibration.target_fpr"),
        ({"calibration": {"target_fpr": 1.0}}, "model.calibration.target_fpr"),
        ({"calibration": {"quantile": 0.0}}, "model.calibration.target_fpr"),  # the old form, 1 - target_fpr
        ({"calibration": {"folds": 1}}, "model.calibration.folds"),
        ({"calibration": {"margin": 0}}, "model.calibration.margin"),
        ({"batch_size": 0}, "model.batch_size"),
        ({"map_sigma": -1}, "model.map_sigma"),
        ({"layers": []}, "model.layers"),
        ({"image_size": [31, 256]}, "model.image_size"),
    ],
)
def test_out_of_range_values(data, path):
    assert path in config_error(data)


def test_boundary_values_are_fine():
    cfg = model_config_from_dict(
        {
            "map_sigma": 0,
            "image_size": [32, 32],
            "patchcore": {"coreset_ratio": 1.0, "patch_size": 1, "shards": 1},
            "calibration": {"target_fpr": 0.5, "folds": 2},
            "padim": {"eps": 0},
        }
    )
    assert cfg.patchcore.coreset_ratio == 1.0 and cfg.map_sigma == 0.0


# --------------------------------------------------------------------------- nested sections and crop


def test_nested_sections():
    cfg = model_config_from_dict(
        {
            "patchcore": {"shards": 4, "index": "hnsw", "hnsw_ef_search": 64, "score": "reweighted"},
            "calibration": {"folds": 10, "margin": 1.5},
            "gaussian": {"eps": 1e-4},
        }
    )
    assert cfg.patchcore.shards == 4 and cfg.patchcore.index == "hnsw" and cfg.patchcore.hnsw_ef_search == 64
    assert cfg.patchcore.score == "reweighted" and cfg.patchcore.patch_size == 3  # untouched default
    assert cfg.calibration == CalibrationConfig(target_fpr=0.01, folds=10, margin=1.5)
    assert cfg.gaussian.eps == 1e-4


def test_old_calibration_keys():
    """`quantile: q` of older configs means target_fpr 1 - q; `holdout` is an error in a user's config and
    dropped from a fitted model's manifest (its threshold is already set)."""
    cfg = model_config_from_dict({"calibration": {"quantile": 0.95, "margin": 1.2}})
    assert cfg.calibration.target_fpr == pytest.approx(0.05) and cfg.calibration.margin == 1.2
    assert "target_fpr only" in config_error({"calibration": {"quantile": 0.95, "target_fpr": 0.05}})
    msg = config_error({"calibration": {"holdout": 0.1}})
    assert "model.calibration.holdout was removed" in msg and "folds" in msg
    old = {"calibration": {"holdout": 0.1, "quantile": 0.99, "margin": 1.0}}
    assert model_config_from_dict(old, fitted=True).calibration.target_fpr == pytest.approx(0.01)
    # a fitted model's quantile 1.0 (its maximum) still loads
    assert model_config_from_dict({"calibration": {"quantile": 1.0}}, fitted=True).calibration.target_fpr > 0


def test_nested_value_error_has_full_path():
    assert "model.calibration.margin must be a number" in config_error({"calibration": {"margin": "big"}})


@pytest.mark.parametrize("crop", [[257, 200], [200, 300], [300, 300]])
def test_center_crop_larger_than_image_size(crop):
    msg = config_error({"image_size": [256, 256], "center_crop": crop})
    assert "model.center_crop" in msg and "256" in msg


@pytest.mark.parametrize("crop", [[0, 0], [-8, 224], [224, 0]])
def test_center_crop_must_be_positive(crop):
    assert "model.center_crop" in config_error({"image_size": [256, 256], "center_crop": crop})


def test_center_crop_within_non_square_image():
    cfg = model_config_from_dict({"image_size": [256, 320], "center_crop": [256, 288]})
    assert cfg.center_crop == (256, 288)
    assert "model.center_crop" in config_error({"image_size": [320, 256], "center_crop": [256, 288]})


# --------------------------------------------------------------------------- from_dict on any section


def test_from_dict_other_section_path():
    with pytest.raises(ConfigError, match=r"run\.calibration\.bogus"):
        from_dict(ModelConfig, {"calibration": {"bogus": 1}}, "run")
    assert from_dict(CalibrationConfig, {"margin": 2}, "x") == CalibrationConfig(margin=2.0)


def test_resize_option_and_models_fitted_before_it():
    assert model_config_from_dict({}).resize == "pillow"
    assert model_config_from_dict({"resize": "torch"}).resize == "torch"
    with pytest.raises(ConfigError, match="pillow"):
        model_config_from_dict({"resize": "cv2"})
    # a fitted model's manifest without the key was fitted with Pillow's resize, whatever the default is now
    old = {k: v for k, v in dataclasses.asdict(ModelConfig()).items() if k != "resize"}
    assert model_config_from_dict(old, fitted=True).resize == "pillow"
    new = dataclasses.asdict(ModelConfig(resize="torch"))
    assert model_config_from_dict(new, fitted=True).resize == "torch"
