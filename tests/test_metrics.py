"""PSNR/SSIM against values known in closed form; rFID/rKID with a pluggable feature network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.metrics import FeatureNet, fid_kid, inception_features, psnr, reconstruction_metrics, ssim


def smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] with structure at several scales (upsampled noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1
    fine = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return (0.8 * F.interpolate(coarse, size=size, mode="bilinear") + 0.2 * fine).clamp(-1, 1)


class RecordingNet(nn.Module):
    """A small random conv net that remembers the value range of what it was fed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 12, 3, stride=2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.seen_min, self.seen_max = math.inf, -math.inf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_min, self.seen_max = min(self.seen_min, x.min().item()), max(self.seen_max, x.max().item())
        return self.net(x)


def test_psnr_of_a_constant_error_is_known():
    real = torch.zeros(2, 3, 8, 8)
    fake = real + 0.2  # 0.1 in [0, 1] units: MSE 0.01 -> 20 dB
    assert psnr(real, fake) == pytest.approx(20.0, abs=1e-4)
    assert psnr(real, real + 0.02) == pytest.approx(40.0, abs=1e-3)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    real = smooth_images(4)
    assert ssim(real, real) == pytest.approx(1.0, abs=1e-6)
    noisy = (real + 0.3 * torch.randn_like(real)).clamp(-1, 1)
    assert ssim(real, noisy) < 0.9


def test_rfid_with_a_pluggable_network_ranks_a_worse_reconstruction_higher():
    real = smooth_images(48, seed=1)
    g = torch.Generator().manual_seed(2)
    good = (real + 0.05 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    bad = (real + 0.5 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    net = RecordingNet()
    same = reconstruction_metrics(real, real, fid=True, features=net)
    scores_good = reconstruction_metrics(real, good, fid=True, features=net)
    scores_bad = reconstruction_metrics(real, bad, fid=True, features=net)
    # important: the network gets the images as passed, in [-1, 1] (not [0, 1], not uint8)
    assert net.seen_min < -0.5 and net.seen_max > 0.5 and net.seen_max <= 1.0
    assert abs(same["rfid"]) < 1e-3 and abs(same["rkid"]) < 1e-3
    assert 0 < scores_good["rfid"] < scores_bad["rfid"]
    assert scores_good["rkid"] < scores_bad["rkid"]
    assert scores_good["psnr"] > scores_bad["psnr"]
    assert "rfid" not in reconstruction_metrics(real, good)  # only when asked


def test_fid_takes_a_callable_through_featurenet_and_computes_features_once():
    real, fake = smooth_images(16, seed=3), smooth_images(16, seed=4)
    net = RecordingNet()
    calls = []

    def features(x):
        calls.append(len(x))
        return net(x)

    wrapped = FeatureNet(features, 12)
    direct = fid_kid(real, fake, net)
    via_callable = fid_kid(real, fake, wrapped)
    assert via_callable["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert sum(calls) == 32  # each image once, shared by FID and KID

    bound = FeatureNet(net.forward, 12)  # a bound method: its module's weights are registered
    assert sum(p.numel() for p in bound.parameters()) == sum(p.numel() for p in net.parameters())


def test_fid_needs_two_images_per_set():
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(smooth_images(1), smooth_images(4), RecordingNet())


def test_inception_missing_weights_name_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        inception_features(missing)
    # asked for rFID with no network: the default Inception is looked up in torch's hub cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match="another feature network") as err:
        reconstruction_metrics(smooth_images(2), smooth_images(2), fid=True)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(err.value)


class _NotTensors:
    pass


def test_inception_refuses_a_pickle_that_is_not_plain_tensors(tmp_path):
    pytest.importorskip("torch_fidelity")
    path = tmp_path / "weights.pth"
    torch.save({"x": _NotTensors()}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        inception_features(path)


@pytest.mark.slow
def test_default_inception_network_from_a_local_file(tmp_path, monkeypatch):
    """The default Inception runs from a weights file on disk (random weights here: no download)."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tf

    # Build torch-fidelity's network without its weights, to write a file with its state-dict layout.
    monkeypatch.setattr(tf, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    torch.manual_seed(0)
    state = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)

    net = inception_features(path)
    real = smooth_images(4, size=32, seed=5)
    assert net(real).shape == (4, 2048)
    scores = reconstruction_metrics(real, smooth_images(4, size=32, seed=6), fid=True, features=net)
    assert math.isfinite(scores["rfid"]) and scores["rfid"] > 0
