"""Image metrics: PSNR/SSIM, FID/KID with a pluggable feature network, CLIP score.

FID and KID come from torchmetrics, which accepts any `nn.Module` as its feature extractor.
The default Inception-v3 (torch-fidelity's FID weights) is used only when its weights are on
disk (`inception_weights`); offline, or on a domain far from ImageNet, pass another network,
e.g. the image tower of a CLIP trained on your own data (`ldm.train.clip.load_clip_scorer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of images in [-1, 1]."""
    per_image = [peak_signal_noise_ratio(_to_unit(f)[None], _to_unit(r)[None], data_range=1.0) for r, f in zip(real, fake)]
    return torch.stack(per_image).mean().item()


def ssim(real: torch.Tensor, fake: torch.Tensor) -> float:
    return structural_similarity_index_measure(_to_unit(fake), _to_unit(real), data_range=1.0).item()


class FeatureNet(nn.Module):
    """Adapts a callable (uint8 or [0,1] images -> (B, D) features) to torchmetrics' interface."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def inception_features(weights: str | Path) -> nn.Module:
    """torch-fidelity's FID Inception-v3 from a local weights file (pt_inception-2015-12-05-6726825d.pth)."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"FID's Inception weights are not at {weights}; pass another feature network "
            "(e.g. a CLIP image tower trained here) or set the path to pt_inception-2015-12-05-6726825d.pth"
        )
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))


def default_feature_net() -> nn.Module | None:
    """Inception when LDM_INCEPTION_WEIGHTS points at its weights, else None (FID skipped)."""
    import os

    path = os.environ.get("LDM_INCEPTION_WEIGHTS")
    return inception_features(path) if path else None


def fid_kid(real: torch.Tensor, fake: torch.Tensor, features: nn.Module, kid_subset: int = 50) -> dict[str, float]:
    """FID and KID between two sets of images in [-1, 1] with the given feature network."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fid = FrechetInceptionDistance(feature=features, normalize=True)
    kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=min(kid_subset, len(real), len(fake)))
    for metric in (fid, kid):
        metric.update(_to_unit(real), real=True)
        metric.update(_to_unit(fake), real=False)
    kid_mean, _ = kid.compute()
    return {"fid": fid.compute().item(), "kid": kid_mean.item()}


def reconstruction_metrics(real: torch.Tensor, recon: torch.Tensor, fid: bool = False, features: nn.Module | None = None) -> dict[str, float]:
    results = {"psnr": psnr(real, recon), "ssim": ssim(real, recon), "mse": torch.mean((real - recon) ** 2).item()}
    if fid:
        features = features or default_feature_net()
        if features is not None:
            scores = fid_kid(real, recon, features)
            results.update(rfid=scores["fid"], rkid=scores["kid"])
    return results


@torch.no_grad()
def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """CLIP score (Hessel et al. 2021): 100 * mean cosine similarity of matched pairs, floored at 0."""
    image_features = torch.nn.functional.normalize(image_features.float(), dim=-1)
    text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
    return (100 * (image_features * text_features).sum(-1).clamp(min=0)).mean().item()
