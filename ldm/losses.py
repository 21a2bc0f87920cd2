"""Losses: the KL-VAE objective (stage 1) and the diffusion objective (stage 3).

The VAE loss follows Rombach et al. 2022 (LDM, appendix G) and Esser et al. 2021 (VQGAN):
reconstruction + perceptual as a Laplacian/Gaussian NLL with a learned log-variance, a KL term
towards N(0, I), and a PatchGAN discriminator whose weight is adapted by the ratio of gradient
norms at the decoder's last layer (VQGAN eq. 7). Three things references get quietly wrong are
right here, and tests/test_vae_loss.py pins each of them:

- the perceptual loss is computed *with* gradient (it is a training signal, not a metric);
- the discriminator sees `reconstruction.detach()`, so its step never reaches the autoencoder,
  and it scores the generator's output with its own weights frozen, so the generator step never
  reaches the discriminator;
- the log-variance is an `nn.Parameter` that the autoencoder's optimiser actually updates.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.config import require


@dataclasses.dataclass
class VAELossConfig:
    reconstruction: Literal["l1", "l2"] = "l1"  # pixel loss inside the NLL
    gradient_weight: float = 0.0                # image-gradient term (see gradient_difference): keeps corners a pixel loss rounds off
    perceptual_weight: float = 0.0              # LPIPS weight; needs local VGG16 weights (lpips_vgg_path)
    lpips_vgg_path: str = ""                    # torchvision vgg16 state dict (.pth/.safetensors), e.g. vgg16-397923af.pth
    learn_logvar: bool = True                   # learned scalar log-variance of the NLL (LDM); false: fixed at logvar_init
    logvar_init: float = 0.0                    # initial log-variance s (NLL = rec / exp(s) + s)
    kl_weight: float = 1e-6                     # weight of KL(q(z|x) || N(0, I)), summed over latent elements
    disc_weight: float = 0.5                    # base weight of the generator's adversarial loss
    disc_start: int = 50_001                    # optimiser step at which the discriminator starts
    disc_loss: Literal["hinge", "vanilla"] = "hinge"  # vanilla: BCE for D, non-saturating -log D(G(z)) for G
    disc_layers: int = 3                        # PatchGAN depth (receptive field 70 px at 3)
    disc_channels: int = 64                     # width of the PatchGAN's first layer (x2 per layer, up to x8)
    adaptive_disc_weight: bool = True           # VQGAN eq. 7: balance GAN and NLL gradients at the last layer

    def validate(self) -> None:
        require(self.gradient_weight >= 0, "loss.gradient_weight must be >= 0")
        require(self.perceptual_weight >= 0, "loss.perceptual_weight must be >= 0")
        require(self.kl_weight >= 0, "loss.kl_weight must be >= 0")
        require(self.disc_weight >= 0, "loss.disc_weight must be >= 0")
        require(self.disc_layers >= 1, "loss.disc_layers must be >= 1")
        if self.perceptual_weight > 0:
            require(
                bool(self.lpips_vgg_path) and Path(self.lpips_vgg_path).is_file(),
                "loss.perceptual_weight > 0 needs LPIPS' VGG16 backbone weights on disk: set "
                f"loss.lpips_vgg_path to torchvision's vgg16 state dict (vgg16-397923af.pth), got "
                f"{self.lpips_vgg_path!r}; or turn the perceptual loss off with loss.perceptual_weight=0",
            )


def gradient_difference(x: torch.Tensor, recon: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """Per-pixel gradient difference loss (Mathieu et al. 2016), shape (B, C, H, W).

    The error of the horizontal and vertical finite differences, squared (l2) or absolute
    (l1), summed. A pixel loss pays little for rounding off a corner or a point of a small
    object, a few pixels of error; this term pays at every edge pixel whose slope is wrong,
    so a small VAE learns sharp shapes in far fewer steps. Without a pretrained network
    (LPIPS needs VGG weights), it is the sharpening term that works offline.
    """
    d = x - recon
    dx = F.pad(d[..., :, 1:] - d[..., :, :-1], (0, 1))
    dy = F.pad(d[..., 1:, :] - d[..., :-1, :], (0, 0, 0, 1))
    if kind == "l1":
        return dx.abs() + dy.abs()
    return dx**2 + dy**2


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017, pix2pix), as used by VQGAN and the SD VAE."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for i in range(1, layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < layers else 1
            width = channels * mult
            groups = math.gcd(min(32, width // 4), width)  # up to 32 groups, always dividing the width
            blocks += [
                nn.Conv2d(channels * prev, width, 4, stride, 1, bias=False),
                nn.GroupNorm(groups, width),
                nn.LeakyReLU(0.2, True),
            ]
        blocks.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_lpips(vgg_path: str | Path) -> nn.Module:
    """LPIPS-VGG (Zhang et al. 2018) with its backbone from a local file; no download.

    The lpips package ships its learned linear heads; only torchvision's VGG16 weights come
    from outside, so we build the backbone without weights and load them from `vgg_path`
    (a torchvision vgg16 state dict, .pth or .safetensors; only its `features.*` are used).
    """
    try:
        import lpips
    except ImportError as err:
        raise ImportError("the perceptual loss needs lpips: pip install lpips, or set loss.perceptual_weight=0") from err
    from ldm.safetensors_io import load_safetensors

    vgg_path = Path(vgg_path)
    if not vgg_path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs torchvision's VGG16 weights at {vgg_path} (vgg16-397923af.pth); "
            "set loss.lpips_vgg_path, or loss.perceptual_weight=0 to train without it"
        )
    state = load_safetensors(vgg_path) if vgg_path.suffix == ".safetensors" else torch.load(vgg_path, map_location="cpu", weights_only=True)
    missing = [key for key in _vgg16_conv_keys() if key not in state]
    if missing:
        raise ValueError(f"{vgg_path} is not a torchvision vgg16 state dict: it lacks {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}; or set loss.perceptual_weight=0")
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    # lpips splits torchvision's vgg.features into slice1..slice5 that keep the original indices.
    model.net.load_state_dict({name: state[f"features.{name.split('.', 1)[1]}"] for name in model.net.state_dict()})
    model.eval().requires_grad_(False)
    return model


def _vgg16_conv_keys() -> list[str]:
    """State-dict keys of the 13 convolutions of torchvision's vgg16.features (all LPIPS uses)."""
    from torchvision.models.vgg import cfgs

    keys, index = [], 0
    for layer in cfgs["D"]:  # "M" is a max-pool; a number is a conv followed by a ReLU
        if layer != "M":
            keys += [f"features.{index}.weight", f"features.{index}.bias"]
        index += 1 if layer == "M" else 2
    return keys


class _frozen:
    """Context manager: `module`'s parameters take no gradient inside (they still pass it on)."""

    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)


class VAELoss(nn.Module):
    """Generator and discriminator objectives of the KL-VAE; holds the learned log-variance."""

    def __init__(self, cfg: VAELossConfig):
        super().__init__()
        self.cfg = cfg
        self.logvar = nn.Parameter(torch.tensor(float(cfg.logvar_init)), requires_grad=cfg.learn_logvar)
        self.perceptual = load_lpips(cfg.lpips_vgg_path) if cfg.perceptual_weight > 0 else None
        self.discriminator = PatchDiscriminator(channels=cfg.disc_channels, layers=cfg.disc_layers)

    def disc_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def pixel_loss(self, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel reconstruction (+ perceptual) loss, shape (B, C, H, W)."""
        if self.cfg.reconstruction == "l1":
            rec = (x - recon).abs()
        else:
            rec = (x - recon) ** 2
        if self.cfg.gradient_weight > 0:
            rec = rec + self.cfg.gradient_weight * gradient_difference(x, recon, self.cfg.reconstruction)
        if self.perceptual is not None:
            # important: with gradient. LPIPS is a training signal here, not a metric.
            # Its (B, 1, 1, 1) distance is added to every pixel, as in LDM's LPIPSWithDiscriminator.
            rec = rec + self.cfg.perceptual_weight * self.perceptual(x.float(), recon.float())
        return rec

    def nll(self, rec: torch.Tensor) -> torch.Tensor:
        """NLL under a Laplace (l1) or Gaussian (l2) with one scale s = logvar, up to constants
        (LDM's LPIPSWithDiscriminator): rec / exp(s) + s per pixel, summed per image, mean over
        the batch. With learn_logvar false, s stays at logvar_init."""
        nll = rec / torch.exp(self.logvar) + self.logvar
        return nll.sum() / rec.shape[0]

    def generator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, posterior, step: int, last_layer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder objective: NLL + kl_weight * KL + adaptive_weight * disc_weight * GAN.

        `posterior` is diffusers' DiagonalGaussianDistribution; its kl() is summed per image.
        """
        rec = self.pixel_loss(x, recon)
        nll = self.nll(rec)
        kl = posterior.kl().sum() / x.shape[0]
        loss = nll + self.cfg.kl_weight * kl
        logs = {"rec": rec.mean().item(), "nll": nll.item(), "kl": kl.item(), "logvar": self.logvar.item()}
        if self.disc_active(step):
            # important: the discriminator only scores here; its weights take no gradient from
            # the generator's loss, so the generator step cannot move it (tests pin this).
            with _frozen(self.discriminator):
                logits_fake = self.discriminator(recon)
            if self.cfg.disc_loss == "hinge":
                g_loss = -logits_fake.mean()              # VQGAN / LDM generator loss
            else:
                g_loss = F.softplus(-logits_fake).mean()  # non-saturating: -log sigmoid(D(G(z)))
            weight = self.adaptive_weight(nll, g_loss, last_layer) * self.cfg.disc_weight
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.item(), d_weight=float(weight))
        return loss, logs

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """VQGAN eq. 7: lambda = |grad_L nll| / (|grad_L g_loss| + 1e-4) at the decoder's last layer L."""
        if not self.cfg.adaptive_disc_weight or last_layer is None or not torch.is_grad_enabled():
            return torch.tensor(1.0, device=nll.device)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach()

    def discriminator_loss(
        self, x: torch.Tensor, recon: torch.Tensor, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator objective. important: `recon` is detached here, so this never trains the AE.

        `discriminator` is the module that scores (default `self.discriminator`); the trainer
        passes its accelerate-prepared wrapper so that DDP averages its gradients. Real and fake
        go through one forward (GroupNorm is per image, so they do not mix).
        """
        discriminator = discriminator or self.discriminator
        logits_real, logits_fake = discriminator(torch.cat([x.detach(), recon.detach()])).chunk(2)
        if self.cfg.disc_loss == "hinge":
            loss = 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
        else:
            loss = 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())
        return loss, {"d_loss": loss.item(), "logits_real": logits_real.mean().item(), "logits_fake": logits_fake.mean().item()}


# ----------------------------------------------------------------------------- diffusion


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 9), per sample.

    For an epsilon target the weight is min(SNR, gamma) / SNR; for a v target, whose loss is
    already scaled by (SNR + 1) relative to x0, it is min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr.clamp(min=1e-8)


def diffusion_loss(
    model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample, optionally weighted (min-SNR), averaged over the batch."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
