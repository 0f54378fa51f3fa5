"""SimpleNet's pieces on synthetic features: the loss, the discriminator's separation, save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchaudit.workers.simplenet import SimpleNetHead, feature_scale, train_head, truncated_l1


def test_truncated_l1_is_zero_beyond_the_margins_and_linear_inside():
    normal, noisy = torch.tensor([0.7, 0.2]), torch.tensor([-0.9, 0.1])
    # normal: max(0, .5-.7)=0, max(0, .5-.2)=.3 -> mean .15; noisy: max(0, .5-.9)=0, max(0, .5+.1)=.6 -> mean .3
    assert float(truncated_l1(normal, noisy, 0.5)) == pytest.approx(0.45)
    assert float(truncated_l1(torch.ones(3), -torch.ones(3), 0.5)) == 0.0


def test_feature_scale_global_keeps_the_feature_geometry_and_channel_equalises():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(5000, 3, generator=g) * torch.tensor([1.0, 2.0, 4.0]) + torch.tensor([5.0, 0.0, -1.0])
    mean, std = feature_scale(feats, "global")
    z = (feats - mean) / std
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-4)
    # one scale: the ratios between channels stay 1 : 2 : 4, and the mean channel variance becomes 1
    ratios = z.std(0) / z.std(0)[0]
    assert torch.allclose(ratios, torch.tensor([1.0, 2.0, 4.0]), rtol=0.05)
    assert float(z.var(0).mean()) == pytest.approx(1.0, rel=1e-3)
    mean, std = feature_scale(feats, "channel")
    assert torch.allclose(((feats - mean) / std).std(0), torch.ones(3), atol=1e-4)
    with pytest.raises(ValueError, match="global"):
        feature_scale(feats, "robust")


@pytest.fixture
def one_thread():
    """Small matrix products: one thread is quick, and immune to other processes on the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_discriminator_separates_shifted_from_normal_features(one_thread):
    """Trained on normal features only (noise as the anomalies), it scores features shifted off the
    normal distribution lower than new normal features: the property the method rests on."""
    g = torch.Generator().manual_seed(0)
    d = 16
    basis = torch.randn(d, d, generator=g)
    normal = torch.randn(4000, d, generator=g) @ basis * 0.3  # correlated normal features
    mean, std = normal.mean(0), normal.std(0)
    z = (normal - mean) / std
    head, losses = train_head(
        z, hidden=32, noise_std=0.5, steps=300, batch=256, lr_adaptor=1e-3, lr_discriminator=2e-3, margin=0.5, seed=0
    )
    assert losses[-1] < losses[0]
    fresh = (torch.randn(500, d, generator=g) @ basis * 0.3 - mean) / std
    shifted = fresh + 1.5 * torch.randn(500, d, generator=g).sign()  # off the normal manifold
    with torch.no_grad():
        s_normal = -head(head.adaptor(fresh))
        s_shift = -head(head.adaptor(shifted))
    # AUROC of the anomaly score: shifted above normal
    auroc = (s_shift[:, None] > s_normal[None, :]).float().mean().item()
    assert auroc > 0.95
    assert (s_normal < 0).float().mean() > 0.9  # most normal features on the normal side of the boundary


def test_head_state_round_trips_through_numpy():
    torch.manual_seed(0)
    head = SimpleNetHead(8, 4).eval()
    arrays = {k: v.detach().numpy() for k, v in head.state_dict().items()}
    other = SimpleNetHead(8, 4)
    other.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()})
    other.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(head(head.adaptor(x)), other(other.adaptor(x)), atol=1e-6)


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_fit_save_load_score_end_to_end(tmp_path, one_thread):
    """A few training steps on a tiny synthetic set: the threshold comes from cross-fitting, a red square
    scores above normal images, and the saved model scores exactly as the fitted one."""
    from patchaudit.store.objects import open_store
    from patchaudit.workers.config import model_config_from_dict
    from patchaudit.workers.fit import fit_model
    from patchaudit.workers.model import load_model
    from patchaudit.workers.pipeline import score_keys

    rng = np.random.default_rng(0)
    store = open_store(str(tmp_path / "data"))

    def normal() -> np.ndarray:
        base = np.linspace(60, 160, 64)[None, :, None].repeat(64, 0).repeat(3, 2)
        return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)

    for i in range(8):
        store.write_bytes(f"train/good/{i}.png", _png(normal()))
    spot = normal()
    spot[20:36, 20:36] = (250, 20, 20)
    store.write_bytes("q/good.png", _png(normal()))
    store.write_bytes("q/spot.png", _png(spot))
    cfg = model_config_from_dict(
        {
            "method": "simplenet",
            "backbone": "mobilenetv2_100",
            "layers": [2, 3],
            "image_size": [64, 64],
            "device": "cpu",
            "batch_size": 4,
            "calibration": {"folds": 2},
            "simplenet": {"steps": 60, "batch_patches": 128, "hidden": 32},
        }
    )
    keys = sorted(k.key for k in store.list("train/good/"))
    model, info = fit_model(cfg, store, keys, threads=1)
    assert info["calibration"]["folds"] == 2 and np.isfinite(model.threshold)
    res = {
        r.key: r for r in score_keys(model, store.read_bytes, ["q/good.png", "q/spot.png"], threads=1, keep_maps=True)
    }
    assert res["q/spot.png"].score > res["q/good.png"].score
    assert res["q/spot.png"].amap.shape == (64, 64)
    model.save(str(tmp_path / "model"))
    loaded = load_model(str(tmp_path / "model"), device="cpu")
    again = {r.key: r.score for r in score_keys(loaded, store.read_bytes, list(res), threads=1)}
    for k, r in res.items():
        assert again[k] == pytest.approx(r.score, rel=1e-5, abs=1e-6)


def test_heads_trained_at_once_in_threads_equal_heads_trained_alone(one_thread):
    """Cross-fitting trains fold heads concurrently: each must not depend on the others' timing."""
    from concurrent.futures import ThreadPoolExecutor

    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(600, 8, generator=g) for _ in range(3)]

    def train(i: int) -> torch.Tensor:
        head, _ = train_head(feats[i], 16, 0.5, 40, 64, 1e-3, 2e-3, 0.5, seed=i)
        with torch.no_grad():
            return head(head.adaptor(feats[0]))

    alone = [train(i) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(train, range(3)))
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b)
