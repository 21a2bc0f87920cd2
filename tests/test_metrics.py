"""PSNR/SSIM against values known in closed form; rFID/rKID with a pluggable feature network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.metrics import (FeatureNet, IncomparableMetricsError, bootstrap_interval, caption_ranks, chance_figures,
                         check_comparable, fid_kid, frechet_distance, inception_features, kernel_distance,
                         network_weights, psnr, reconstruction_metrics, retrieval_figures, ssim)


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


# ----------------------------------------------------------------------------- generated vs real (issue #19)


def _gaussian_features(n: int, d: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64) + shift


@pytest.mark.parametrize("d", [8, 140])  # fewer and more dimensions than images
@pytest.mark.filterwarnings("ignore:.*will save all extracted features")
def test_frechet_and_kernel_distances_equal_torchmetrics(d):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _gaussian_features(120, d, seed=1), _gaussian_features(100, d, shift=0.3, seed=2)
    identity = FeatureNet(nn.Identity(), d)
    fid = FrechetInceptionDistance(feature=identity)
    kid = KernelInceptionDistance(feature=identity, subsets=1, subset_size=100)  # the whole fake set: a permutation
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    assert frechet_distance(real, fake) == pytest.approx(fid.compute().item(), rel=1e-4)
    # torchmetrics takes 100 of the 120 real ones; on equal sets the full-pair estimate is the same
    kid_same = KernelInceptionDistance(feature=identity, subsets=1, subset_size=100)
    kid_same.update(real[:100], real=True)
    kid_same.update(fake, real=False)
    assert kernel_distance(real[:100], fake) == pytest.approx(kid_same.compute()[0].item(), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    far = _gaussian_features(100, d, shift=1.0, seed=2)
    assert frechet_distance(real, far) > frechet_distance(real, fake) and kernel_distance(real, far) > kernel_distance(real, fake)


def test_distances_need_two_images():
    with pytest.raises(ValueError, match="at least 2 images per set, got 1 real"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="KID needs at least 2"):
        kernel_distance(torch.zeros(5, 4), torch.zeros(1, 4))


def test_caption_ranks_find_the_own_caption_and_merge_identical_texts():
    captions = ["red", "blue", "green", "red"]  # "red" twice: one candidate, right for images 0 and 3
    text = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    image = torch.tensor([[1.0, 0.1, 0.0],    # nearest "red": rank 1
                          [0.9, 0.5, 0.0],    # "red" beats its "blue": rank 2
                          [0.3, 0.2, 0.1],    # "green" last of 3: rank 3
                          [0.2, 0.0, 0.9]])   # "green" beats its "red": rank 2
    ranks, candidates = caption_ranks(image, text, captions)
    assert candidates == 3 and ranks.tolist() == [1, 2, 3, 2]
    figures = retrieval_figures(ranks)
    assert figures == {"top1": 0.25, "top5": 1.0, "mean_rank": 2.0}
    assert chance_figures(3) == {"top1": 1 / 3, "top5": 1.0, "mean_rank": 2.0}
    assert chance_figures(200)["top1"] == 1 / 200 and chance_figures(200)["top5"] == 5 / 200


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_data():
    def rate(values):
        return lambda idx: {"mean": values[idx].double().mean().item()}

    small = (torch.arange(40) % 4 == 0).float()     # rate 0.25 over 40 items
    large = (torch.arange(1000) % 4 == 0).float()   # the same rate over 1,000
    lo_s, hi_s = bootstrap_interval(rate(small), len(small), resamples=300)["mean"]
    lo_l, hi_l = bootstrap_interval(rate(large), len(large), resamples=300)["mean"]
    assert lo_s < 0.25 < hi_s and lo_l < 0.25 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~1/sqrt(25) as wide
    assert bootstrap_interval(rate(small), 40, resamples=50) == bootstrap_interval(rate(small), 40, resamples=50)  # seeded
    assert bootstrap_interval(rate(small), 40, resamples=0) == {}


def test_fid_interval_is_centred_on_the_fid_it_qualifies():
    """Resampling with replacement repeats images and lifts FID: the plain percentile interval of two
    sets from one distribution lies above their FID; centred on it, it brackets it."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)

    def fid(idx):
        return {"fid": frechet_distance(real[idx], fake[idx])}

    point = fid(torch.arange(200))
    plain = bootstrap_interval(fid, 200, resamples=100)["fid"]
    centred = bootstrap_interval(fid, 200, resamples=100, center=point)["fid"]
    assert plain[0] > point["fid"]  # the bias this guards against
    assert centred[0] < point["fid"] < centred[1]
    assert abs((centred[1] - centred[0]) - (plain[1] - plain[0])) < 1e-9  # moved, not widened


def test_check_comparable_refuses_another_network_or_n_and_ignores_the_path():
    ours = {"features": "clip:runs/demo/clip@aaaa1111", "n": 200}
    check_comparable(ours, {"features": "clip:/elsewhere/clip@aaaa1111", "n": 200})  # same weights, moved
    with pytest.raises(IncomparableMetricsError, match="feature network.*inception"):
        check_comparable(ours, {"features": "inception:/w/pt_inception.pth@bbbb2222", "n": 200})
    with pytest.raises(IncomparableMetricsError, match="feature network"):
        check_comparable(ours, {"features": "clip:runs/demo/clip@cccc3333", "n": 200})  # retrained CLIP
    with pytest.raises(IncomparableMetricsError, match="n 200 vs 100"):
        check_comparable(ours, {"features": ours["features"], "n": 100})
    check_comparable(ours, {**ours, "offset": 0})  # no offset recorded: the first held-out images
    with pytest.raises(IncomparableMetricsError, match="offset 0 vs 200"):  # the other half of the held-out split
        check_comparable(ours, {**ours, "offset": 200})
    assert network_weights("clip:runs/demo/clip@aaaa1111") == "clip@aaaa1111"
