"""Image metrics: PSNR/SSIM, FID/KID with a pluggable feature network, CLIP score.

Images are float tensors in [-1, 1], (B, 3, H, W), everywhere in this package, and so is the
input of a feature network here: any `nn.Module` (or callable, through `FeatureNet`) mapping such
images to (B, D) features. FID and KID are computed from the features (once per image) in closed
form, checked against torchmetrics' in the tests. The default network is Inception-v3 with torch-fidelity's FID weights, used only
from a file on disk (`inception_features`; torch-fidelity would download it into torch's hub
cache, `default_inception_path()`). Offline, or on a domain far from ImageNet, pass another
network, e.g. the image tower of a CLIP trained on your own data:
`FeatureNet(load_clip_scorer(dir).image_features, dim)` (`ldm.train.clip`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception-v3


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1] (peak: the [0, 1] range)."""
    per_image = [peak_signal_noise_ratio(_to_unit(f)[None], _to_unit(r)[None], data_range=1.0) for r, f in zip(real, fake)]
    return torch.stack(per_image).mean().item()


def ssim(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004; 11x11 Gaussian window) of images in [-1, 1]."""
    return structural_similarity_index_measure(_to_unit(fake), _to_unit(real), data_range=1.0).item()


class FeatureNet(nn.Module):
    """A feature network from a callable: (B, 3, H, W) images in [-1, 1] -> (B, num_features)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features
        owner = getattr(fn, "__self__", fn)  # a module, or the module a bound method belongs to
        if isinstance(owner, nn.Module):
            self.owner = owner  # registered, so that .to() and .parameters() see its weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def default_inception_path() -> Path:
    """Where torch-fidelity keeps its Inception weights once downloaded (torch's hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception_features(weights: str | Path | None = None) -> nn.Module:
    """FID's Inception-v3 (2048-d pool features) from a local weights file; no download.

    `weights`: torch-fidelity's weights file; None: `default_inception_path()`.
    """
    weights = Path(weights) if weights else default_inception_path()
    if not weights.is_file():
        raise FileNotFoundError(
            f"FID's Inception weights are not at {weights} (torch-fidelity's {INCEPTION_FILE}); "
            "put them there, or pass another feature network (e.g. a CLIP image tower trained here)"
        )
    return _Inception(weights)


class _Inception(nn.Module):
    """torch-fidelity's FID Inception (through torchmetrics), fed our images as the uint8 it expects."""

    num_features = 2048

    def __init__(self, weights: Path):
        super().__init__()
        try:
            import torch_fidelity  # noqa: F401
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:
            raise ImportError("FID's Inception network needs torch-fidelity: pip install torch-fidelity") from err
        # important: torch-fidelity unpickles the file with weights_only=False; loading it with
        # weights_only=True first refuses a file that holds anything but tensors.
        torch.load(weights, map_location="cpu", weights_only=True)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((_to_unit(x) * 255).round().to(torch.uint8))


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(images: torch.Tensor, features: nn.Module, batch_size: int = 64) -> torch.Tensor:
    """(N, D) float64 features on the CPU of images in [-1, 1], computed on the network's device."""
    device = _device(features)
    out = [features(images[s : s + batch_size].float().to(device)).flatten(1).double().cpu()
           for s in range(0, len(images), batch_size)]
    return torch.cat(out)


def fid_kid(real: torch.Tensor, fake: torch.Tensor, features: nn.Module) -> dict[str, float]:
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) between two sets of images in [-1, 1];
    the network runs once per image (`frechet_distance`, `kernel_distance` below)."""
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(real)} real and {len(fake)} fake")
    real_f, fake_f = extract_features(real, features), extract_features(fake, features)
    return {"fid": frechet_distance(real_f, fake_f), "kid": kernel_distance(real_f, fake_f)}


def reconstruction_metrics(real: torch.Tensor, recon: torch.Tensor, fid: bool = False,
                           features: nn.Module | None = None) -> dict[str, float]:
    """PSNR, SSIM, MSE of reconstructions in [-1, 1]; with `fid`, also rFID and rKID between the
    sets, with `features` (default: Inception from `default_inception_path()`)."""
    results = {"psnr": psnr(real, recon), "ssim": ssim(real, recon), "mse": torch.mean((real - recon) ** 2).item()}
    if fid:
        scores = fid_kid(real, recon, features if features is not None else inception_features())
        results.update(rfid=scores["fid"], rkid=scores["kid"])
    return results


@torch.no_grad()
def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """CLIP score (Hessel et al. 2021): 100 * mean cosine similarity of matched pairs, floored at 0."""
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return (100 * (image_features * text_features).sum(-1).clamp(min=0)).mean().item()


# ----------------------------------------------------------------------------- generated vs real: the figures of issue #19
#
# FID and KID are computed here from features directly (float64), not by torchmetrics' classes:
# the bootstrap recomputes them a few hundred times on resampled features, and KID must not draw
# random subsets (torchmetrics' do, from the global RNG) if figures are to compare across steps.
# tests/test_metrics.py checks both against torchmetrics on the same features.


def frechet_distance(real_f: torch.Tensor, fake_f: torch.Tensor) -> float:
    """FID (Heusel et al. 2017, eq. 6): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    With A1, A2 the centred feature matrices (n x D), S = A^T A / (n - 1), and the nonzero
    eigenvalues of S1 S2 are those of M M^T / c with M = A1 A2^T (n1 x n2), c = (n1-1)(n2-1);
    so tr((S1 S2)^1/2) is M's nuclear norm / sqrt(c): exact, and an n x n SVD instead of a
    D x D matrix square root (2048-d Inception features, a few hundred images).
    """
    a, b = real_f.double(), fake_f.double()
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {n1} real and {n2} generated")
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = a - mu1, b - mu2
    c = (n1 - 1) * (n2 - 1)
    cross = torch.linalg.matrix_norm(a @ b.T, ord="nuc") / math.sqrt(c)
    value = (mu1 - mu2).square().sum() + a.square().sum() / (n1 - 1) + b.square().sum() / (n2 - 1) - 2 * cross
    return max(value.item(), 0.0)  # rounding can take two identical sets a hair below 0


def kernel_distance(real_f: torch.Tensor, fake_f: torch.Tensor) -> float:
    """KID (Binkowski et al. 2018, eq. 4): the unbiased MMD^2 with the kernel (x.y / D + 1)^3, over
    all pairs of the two sets (no random subsets, so the same features always give the same value)."""
    a, b = real_f.double(), fake_f.double()
    n1, n2 = len(a), len(b)
    if n1 < 2 or n2 < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {n1} real and {n2} generated")
    d = a.shape[1]
    k_aa, k_bb, k_ab = ((x @ y.T / d + 1) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    within = (k_aa.sum() - k_aa.diagonal().sum()) / (n1 * (n1 - 1)) + (k_bb.sum() - k_bb.diagonal().sum()) / (n2 * (n2 - 1))
    return (within - 2 * k_ab.mean()).item()


def caption_ranks(image_f: torch.Tensor, text_f: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, int]:
    """The rank (1 = best) of each image's own caption among the distinct captions of the set.

    Image i belongs with captions[i]; the candidates are the distinct texts of `captions` (two
    images may share a caption word for word: it is then one candidate, right for both), ranked
    by cosine similarity with the image. Returns (ranks, number of candidates).
    """
    if len(captions) != len(image_f) or len(captions) != len(text_f):
        raise ValueError(f"caption_ranks: {len(image_f)} images, {len(text_f)} text features, {len(captions)} captions")
    distinct = list(dict.fromkeys(captions))
    first = {text: captions.index(text) for text in distinct}
    candidates = torch.nn.functional.normalize(text_f[[first[t] for t in distinct]].double(), dim=-1)
    sim = torch.nn.functional.normalize(image_f.double(), dim=-1) @ candidates.T  # (images, distinct captions)
    own = torch.tensor([distinct.index(c) for c in captions])
    own_sim = sim.gather(1, own[:, None])
    return 1 + (sim > own_sim).sum(1), len(distinct)


def retrieval_figures(ranks: torch.Tensor) -> dict[str, float]:
    """top-1 and top-5 rates and the mean rank of a set of caption ranks."""
    ranks = ranks.double()
    return {"top1": (ranks <= 1).double().mean().item(), "top5": (ranks <= 5).double().mean().item(),
            "mean_rank": ranks.mean().item()}


def chance_figures(candidates: int) -> dict[str, float]:
    """What a ranking at random scores among `candidates` captions."""
    return {"top1": 1 / candidates, "top5": min(5, candidates) / candidates, "mean_rank": (candidates + 1) / 2}


def bootstrap_interval(statistic: Callable[[torch.Tensor], dict[str, float]], n: int, resamples: int = 200,
                       seed: int = 0, level: float = 0.95, center: dict[str, float] | None = None
                       ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (Efron & Tibshirani 1993, ch. 13) of each figure `statistic`
    returns, from `resamples` draws of n indices with replacement (one index set per draw, shared
    by all figures; a fixed seed, so the same data gives the same interval).

    `center`: the figures on the whole set; each interval of a figure named there is moved so that
    the resamples' median sits on it. important for FID and KID: a resample repeats about a third
    of its images, which shrinks its spread and lifts FID (by 20-40% at N=200 in CLIP features), so
    the plain percentile interval can lie wholly above the figure it qualifies.
    """
    if resamples < 1:
        return {}
    g = torch.Generator().manual_seed(seed)
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        for key, value in statistic(torch.randint(0, n, (n,), generator=g)).items():
            draws.setdefault(key, []).append(value)
    lo, hi = (1 - level) / 2, (1 + level) / 2
    intervals = {}
    for key, values in draws.items():
        shift = center[key] - float(np.median(values)) if center and key in center else 0.0
        intervals[key] = (float(np.quantile(values, lo)) + shift, float(np.quantile(values, hi)) + shift)
    return intervals


class IncomparableMetricsError(ValueError):
    """Two sets of figures made with different feature networks or a different number of images."""


def network_weights(identity: str) -> str:
    """The part of a feature network's identity that names its weights: "clip@1a2b3c4d" for
    "clip:runs/demo/clip@1a2b3c4d" (the path may differ between machines; the weights may not)."""
    kind, _, rest = identity.partition(":")
    return f"{kind}@{rest.rpartition('@')[2]}" if "@" in rest else identity


def check_comparable(ours: dict, theirs: dict, what: str = "these figures", other: str = "the others") -> None:
    """Refuse to compare FID/KID/retrieval figures made with another feature network or another N:
    an FID in CLIP features and one in Inception features, or over 100 and 1,000 images, are
    different numbers, not a better and a worse model. Each dict holds "features" and "n", and
    "offset" where the held-out images did not start at the first (0 when absent)."""
    problems = []
    if network_weights(str(ours.get("features"))) != network_weights(str(theirs.get("features"))):
        problems.append(f"feature network {ours.get('features')!r} vs {theirs.get('features')!r}")
    if ours.get("n") != theirs.get("n"):
        problems.append(f"n {ours.get('n')!r} vs {theirs.get('n')!r} images")
    if ours.get("offset", 0) != theirs.get("offset", 0):  # other held-out images (ldm.quality.real_images)
        problems.append(f"held-out images from offset {ours.get('offset', 0)!r} vs {theirs.get('offset', 0)!r}")
    if problems:
        raise IncomparableMetricsError(f"{what} cannot be compared with {other}: {'; '.join(problems)}. "
                                       "Measure both with the same features, n and offset.")
