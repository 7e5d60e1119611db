"""FID (against scipy's sqrtm), the Inception wrapper, and the dataset classifier's accuracy and FID."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_fast import metrics
from ddpm_fast.data import make_dataset
from ddpm_fast.metrics import (
    DatasetClassifier,
    class_accuracy,
    classifier_fid,
    feature_statistics,
    fid,
    fid_from_features,
    frechet_distance,
    inception_extractor,
    train_classifier,
)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance: np.cov and scipy.linalg.sqrtm of the product."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("n,d", [(300, 8), (500, 64), (80, 32)])
def test_fid_matches_scipy(n, d):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    # b: correlated features with another mean and scale, so the covariances do not commute.
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    b = torch.randn(n + 17, d, generator=g, dtype=torch.float64) @ mix + 0.3
    ours = fid_from_features(a, b)
    ref = scipy_fid(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)
    assert fid_from_features(b, a) == pytest.approx(ours, rel=1e-9)
    # fp32 features give the same number (statistics in fp64).
    assert fid_from_features(a.float(), b.float()) == pytest.approx(ref, rel=1e-5)


def test_fid_basic_properties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    assert abs(fid_from_features(a, a)) < 1e-9
    shift = torch.linspace(-1, 2, 16, dtype=torch.float64)
    assert fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)
    # Diagonal covariances: sum of (sqrt(var_a) - sqrt(var_b))^2.
    var_a, var_b = torch.rand(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    zero = torch.zeros(5, dtype=torch.float64)
    expected = float(((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    assert frechet_distance(zero, var_a.diag(), zero, var_b.diag()) == pytest.approx(expected, rel=1e-10)
    # More samples than dimensions is not required: rank-deficient covariances are fine.
    few = torch.randn(5, 16, generator=g, dtype=torch.float64)
    assert np.isfinite(fid_from_features(few, a)) and fid_from_features(few, a) > 0
    mu, cov = feature_statistics(a)
    torch.testing.assert_close(cov, torch.from_numpy(np.cov(a.numpy(), rowvar=False)))
    torch.testing.assert_close(mu, a.mean(0))


def test_fid_with_an_extractor_is_batch_independent():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(70, 1, 4, 4, generator=g) * 2 - 1
    y = torch.rand(50, 1, 4, 4, generator=g) * 2 - 1
    y = y * 0.5
    ref = fid_from_features(x.flatten(1), y.flatten(1))
    assert fid(x, y, lambda b: b, batch_size=7) == pytest.approx(ref, rel=1e-9)
    assert fid(x, y, lambda b: b.flatten(1), batch_size=1000) == pytest.approx(ref, rel=1e-9)


def test_fid_bad_inputs():
    a = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        fid_from_features(a.flatten(), a)
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(a[:1], a)
    with pytest.raises(ValueError, match="dimensions differ"):
        fid_from_features(a, torch.randn(10, 5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fid_from_features(a, torch.full((10, 4), float("nan")))
    with pytest.raises(TypeError, match="floating"):
        fid_from_features(a.long(), a)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fid_from_features(a.numpy(), a)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fid(a, a, lambda b: b)
    with pytest.raises(ValueError, match="batch_size"):
        fid(a.view(10, 1, 2, 2), a.view(10, 1, 2, 2), lambda b: b, batch_size=0)


# ---------------------------------------------------------------- Inception (pytorch-fid)

FAKE_INCEPTION = """
import torch
from torch import nn

def load_state_dict_from_url(url, progress=True):
    raise RuntimeError("no network: the wrapper must hand over the local file")

class InceptionV3(nn.Module):
    BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}

    def __init__(self, output_blocks, resize_input=True, normalize_input=True):
        super().__init__()
        assert output_blocks == [3] and resize_input
        self.normalize_input = normalize_input
        self.proj = nn.Conv2d(3, 2048, 1)
        self.proj.load_state_dict(load_state_dict_from_url("https://example/pt_inception.pth", progress=True))

    def forward(self, x):
        if self.normalize_input:
            x = 2 * x - 1
        return [nn.functional.adaptive_avg_pool2d(self.proj(x), 1)]
"""


@pytest.fixture
def fake_pytorch_fid(monkeypatch):
    """A stand-in for pytorch_fid.inception with its interface: InceptionV3 fetches its weights
    through the module-level load_state_dict_from_url, as pytorch-fid's fid_inception_v3 does."""
    package = types.ModuleType("pytorch_fid")
    module = types.ModuleType("pytorch_fid.inception")
    exec(FAKE_INCEPTION, module.__dict__)
    package.inception = module
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", module)
    return module


def test_inception_extractor_uses_the_local_file(tmp_path, fake_pytorch_fid):
    g = torch.Generator().manual_seed(0)
    state = {"weight": torch.randn(2048, 3, 1, 1, generator=g), "bias": torch.randn(2048, generator=g)}
    torch.save(state, tmp_path / "pt_inception.pth")
    extract = inception_extractor(tmp_path / "pt_inception.pth")
    grey = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    feats = extract(grey)
    expected = F.conv2d(grey.expand(-1, 3, -1, -1), state["weight"], state["bias"]).mean((2, 3))
    assert feats.shape == (3, 2048)
    torch.testing.assert_close(feats, expected)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        extract(torch.zeros(2, 2, 8, 8))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold pytorch-fid's Inception weights"):
        inception_extractor(tmp_path / "wrong.pth")


def test_inception_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not found"):
        inception_extractor(tmp_path / "missing.pth")
    (tmp_path / "w.pth").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pytorch-fid"):
        inception_extractor(tmp_path / "w.pth")


def import_pytorch_fid_inception() -> types.ModuleType:
    """pytorch_fid.inception, the FID oracle. It is not in the test extra: the torchvision==0.28.0
    that PyPI serves for torch 2.13.0 is its CUDA build, which beside the CPU torch breaks
    ``import diffusers`` (the other oracle). `.ci/run` installs the two for this test alone, after the
    suite, and sets DDPM_FAST_FID_ORACLE=1, under which a missing pytorch-fid fails instead of skipping.

    That torchvision's kernel library does not load beside the CPU torch, and the import then stops at
    its fake kernels for torchvision::nms and qnms, the two registrations that do not check for that
    library. Declaring the two schemas lets the import through; the Inception model is Python and
    uses none of those kernels."""
    try:
        from pytorch_fid import inception
    except ModuleNotFoundError as e:
        if os.environ.get("DDPM_FAST_FID_ORACLE") == "1":
            raise
        pytest.skip(f"pytorch-fid's oracle (run by .ci/run's last step): {e}")
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        from pytorch_fid import inception
    return inception


def test_inception_matches_pytorch_fid(tmp_path):
    """With the real pytorch-fid: our extractor on [-1, 1] images equals pytorch-fid's own model on
    the same images in [0, 1]."""
    fid_inception = import_pytorch_fid_inception()
    # pytorch-fid's fid_inception_v3 architecture with random weights (the real file is a download).
    net = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = fid_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = fid_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = fid_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = fid_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = fid_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = fid_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = fid_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = fid_inception.FIDInceptionE_2(2048)
    state = net.state_dict()
    torch.save(state, tmp_path / "pt_inception.pth")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = inception_extractor(tmp_path / "pt_inception.pth")(images)
    from unittest import mock

    with mock.patch.object(fid_inception, "load_state_dict_from_url", lambda *a, **k: state):
        theirs_model = fid_inception.InceptionV3([3]).eval()
    with torch.no_grad():
        theirs = theirs_model((images + 1) / 2)[0].flatten(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- dataset classifier


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("classifier_cache")
    return train_classifier("digits", 16, seed=0, cache_dir=cache), cache


@pytest.fixture(scope="module")
def digits16():
    return make_dataset("digits", image_size=16, split="train").tensors(), make_dataset(
        "digits", image_size=16, split="test"
    ).tensors()


def test_classifier_accuracy(digits_classifier, digits16):
    model, _ = digits_classifier
    (_, _), (x_test, y_test) = digits16
    assert model.heldout_accuracy >= 0.9
    assert class_accuracy(model, x_test, y_test) == pytest.approx(model.heldout_accuracy)
    # Wrong labels score near chance (1/10): the accuracy reads the labels.
    shuffled = y_test[torch.randperm(len(y_test), generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(model, x_test, shuffled) < 0.3
    assert class_accuracy(model, x_test, (y_test + 1) % 10) < 0.05


def test_classifier_fid_ordering(digits_classifier, digits16):
    model, _ = digits_classifier
    (x_train, _), (x_test, _) = digits16
    g = torch.Generator().manual_seed(0)
    real = classifier_fid(model, x_test, x_train)
    blurred = classifier_fid(model, F.avg_pool2d(x_test, 3, 1, 1, count_include_pad=False), x_train)
    noise = classifier_fid(model, torch.rand(x_test.shape, generator=g) * 2 - 1, x_train)
    assert real < blurred < noise
    assert real < 5.0 and noise > 20 * real  # seen: ~1.5, ~5, ~150


def test_classifier_cache_and_determinism(digits_classifier, monkeypatch, tmp_path):
    model, cache = digits_classifier
    monkeypatch.setattr(metrics, "_dataset_splits", lambda *a: pytest.fail("retrained instead of loading the cache"))
    cached = train_classifier("digits", 16, seed=0, cache_dir=cache)
    assert cached.heldout_accuracy == model.heldout_accuracy
    for (k, v), (k2, v2) in zip(model.state_dict().items(), cached.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    monkeypatch.undo()
    # One short epoch: the same seed gives the same weights, another seed others; the global RNG is untouched.
    rng = torch.get_rng_state()
    a = train_classifier("digits", 8, seed=1, epochs=1)
    b = train_classifier("digits", 8, seed=1, epochs=1)
    c = train_classifier("digits", 8, seed=2, epochs=1)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.head.weight, c.head.weight)
    # A damaged cache file is retrained (with a warning), then replaced.
    bad = metrics._cache_file(tmp_path, "digits", 8, 1, 1, 1)
    bad.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="ignoring the classifier cache"):
        d = train_classifier("digits", 8, seed=1, epochs=1, cache_dir=tmp_path)
    assert torch.equal(d.head.weight, a.head.weight)
    assert torch.equal(train_classifier("digits", 8, seed=1, epochs=1, cache_dir=tmp_path).head.weight, a.head.weight)


def test_classifier_shapes_and_errors(digits_classifier):
    model, _ = digits_classifier
    assert model.features(torch.zeros(3, 1, 16, 16)).shape == (3, 64)
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"takes \(N, 1, 16, 16\)"):
        model(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="labels must lie in"):
        class_accuracy(model, torch.zeros(2, 1, 16, 16), torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="integers"):
        class_accuracy(model, torch.zeros(2, 1, 16, 16), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must be a \(2,\)"):
        class_accuracy(model, torch.zeros(2, 1, 16, 16), torch.tensor([0]))
    with pytest.raises(ValueError, match="built-in datasets"):
        train_classifier("cifar10", 32)
    with pytest.raises(ValueError, match="digits have 1 channel"):
        train_classifier("digits", 16, channels=3)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier("digits", 16, epochs=0)
    # Larger images go through strided convs; the classifier takes any built-in size.
    big = DatasetClassifier(3, 32, 4)
    assert big.features(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
