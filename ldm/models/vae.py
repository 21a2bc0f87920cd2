"""Build or load the KL-VAE (diffusers' AutoencoderKL) and measure its latent scale; the VAE
directory, stage 1's artifact, is written by `save_vae` and read by `load_vae`.

The directory is diffusers' AutoencoderKL format as it is (config.json + safetensors weights;
diffusers versions it), or the `vae/` of a pipeline directory. Ours is in the latent scale: it is
measured on the training data after stage 1 and stored in the config (`scaling_factor`,
`shift_factor`, read back by `latent_scale`), instead of assuming SD's 0.18215: a different VAE,
or the same one on different data, has a different latent variance, and the diffusion schedule
assumes unit-variance latents (Rombach et al. 2022, sec. 4.3.2). That config is the scale's one
source of truth: a latent cache records a copy and is refused where the two differ
(`ldm.data.cache.vae_identity`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL

from ldm.config import require
from ldm.models.presets import VAE_PRESETS, vae_config
from ldm.models.paths import directory_only, model_path_problem


@dataclasses.dataclass
class VAEModelConfig:
    preset: str = "kl-f4"                   # kl-f2 | kl-f4 | kl-f8 (the SD layout) | kl-f16 | tiny-f4 | tiny-f8
    pretrained: str = ""                    # a diffusers AutoencoderKL dir, an SD pipeline dir or .safetensors, to fine-tune
    block_out_channels: list[int] | None = None  # per-level widths; None: the preset's
    latent_channels: int | None = None      # None: the preset's (4)
    layers_per_block: int | None = None
    norm_num_groups: int | None = None      # GroupNorm groups; must divide every width. None: the preset's
    use_shift: bool = False                 # also measure and store a mean shift (SD3/FLUX style)
    remeasure_scale: bool = False           # fine-tuning: measure scaling_factor again on this data. Off by
                                            # default: U-Nets trained on the pretrained VAE expect its scale
    train_decoder_only: bool = False        # fine-tuning: freeze the encoder (how sd-vae-ft-mse was made), so
                                            # latents encoded before, and U-Nets trained on them, stay valid

    def validate(self) -> None:
        require(self.pretrained != "" or self.preset in VAE_PRESETS,
                f"model.preset {self.preset!r} is not one of {sorted(VAE_PRESETS)}")
        for key in ("remeasure_scale", "train_decoder_only"):
            require(self.pretrained != "" or not getattr(self, key),
                    f"model.{key} is for fine-tuning: it needs model.pretrained (a new VAE always measures its scale)")
        if self.pretrained:
            problem = model_path_problem(self.pretrained)
            require(problem is None, f"model.pretrained: {problem}")
        else:
            widths = self.block_out_channels or VAE_PRESETS[self.preset]["block_out_channels"]
            groups = self.norm_num_groups or VAE_PRESETS[self.preset]["norm_num_groups"]
            require(all(w % groups == 0 for w in widths),
                    f"model.norm_num_groups={groups} must divide every width of model.block_out_channels={list(widths)}")


def build_vae(cfg: VAEModelConfig, resolution: int | None = None) -> AutoencoderKL:
    if cfg.pretrained:
        return load_vae(cfg.pretrained)
    overrides = {k: v for k, v in (("block_out_channels", cfg.block_out_channels),
                                   ("latent_channels", cfg.latent_channels),
                                   ("layers_per_block", cfg.layers_per_block),
                                   ("norm_num_groups", cfg.norm_num_groups)) if v is not None}
    if cfg.block_out_channels is not None:  # the number of levels follows the widths given
        overrides["down_block_types"] = ("DownEncoderBlock2D",) * len(cfg.block_out_channels)
        overrides["up_block_types"] = ("UpDecoderBlock2D",) * len(cfg.block_out_channels)
    if resolution is not None:
        overrides["sample_size"] = resolution
    return AutoencoderKL(**vae_config(cfg.preset, **overrides))


def save_vae(vae: AutoencoderKL, path: str | Path, scale: float, shift: float) -> Path:
    """Store the latent scale in the config and save the AutoencoderKL directory (safetensors)."""
    set_latent_scale(vae, scale, shift)
    vae.save_pretrained(path, safe_serialization=True)
    return Path(path)


def load_vae(path: str | Path) -> AutoencoderKL:
    """An AutoencoderKL directory, or the `vae/` of a Stable Diffusion pipeline directory."""
    path = directory_only(path, "load_vae")
    if (path / "vae" / "config.json").exists():
        path = path / "vae"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no AutoencoderKL at {path}: {path / 'config.json'} is missing (nor vae/config.json)")
    return AutoencoderKL.from_pretrained(path, local_files_only=True)


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Freeze everything that makes a latent (encoder, quant_conv): only the decoder learns."""
    for part in (vae.encoder, vae.quant_conv):
        if part is not None:
            part.requires_grad_(False)


def downsample_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_scale(vae: AutoencoderKL) -> tuple[float, float]:
    """(scaling_factor, shift_factor) from the VAE config: z_model = (z - shift) * scale."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return float(vae.config.scaling_factor), float(shift)


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, batches: Iterable[torch.Tensor], use_shift: bool = False) -> tuple[float, float]:
    """Scale (and shift) that bring posterior samples of these images to unit variance (and zero mean).

    The scale is 1/std about the mean, as SD's 0.18215 was measured, so scaled latents have unit
    standard deviation with or without the shift; the shift, when used, also centres them.
    """
    total, total_sq, count = 0.0, 0.0, 0
    device = next(vae.parameters()).device
    for x in batches:
        z = vae.encode(x.to(device)).latent_dist.sample().double()
        total += z.sum().item()
        total_sq += (z * z).sum().item()
        count += z.numel()
    mean = total / count
    var = total_sq / count - mean * mean
    shift = mean if use_shift else 0.0
    return float(1.0 / var**0.5), float(shift)


def set_latent_scale(vae: AutoencoderKL, scale: float, shift: float) -> None:
    vae.register_to_config(scaling_factor=scale, shift_factor=shift if shift else None)


def weights_hash(model: torch.nn.Module) -> str:
    """A short, stable hash of a model's weights (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
