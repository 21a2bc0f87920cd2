"""Build or load the text-conditioned U-Net (diffusers' UNet2DConditionModel)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from diffusers import UNet2DConditionModel

from ldm.config import require
from ldm.models.presets import UNET_PRESETS, unet_config


@dataclasses.dataclass
class UNetModelConfig:
    preset: str = "tiny"                         # tiny | small | sd15 | sd2
    pretrained: str = ""                         # an SD diffusers dir or our pipeline dir to fine-tune
    block_out_channels: list[int] | None = None  # None: the preset's
    layers_per_block: int | None = None
    attention_head_dim: int | None = None
    down_block_types: list[str] | None = None
    up_block_types: list[str] | None = None
    transformer_layers_per_block: int | None = None
    norm_num_groups: int | None = None           # GroupNorm groups; must divide every width

    def validate(self) -> None:
        require(self.pretrained != "" or self.preset in UNET_PRESETS,
                f"model.preset {self.preset!r} is not one of {sorted(UNET_PRESETS)}")
        if self.pretrained:
            require(Path(self.pretrained).is_dir(), f"model.pretrained: no such directory {self.pretrained!r}")


def build_unet(cfg: UNetModelConfig, latent_channels: int, sample_size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """A fresh U-Net sized for the VAE's latents and the text encoder's width, or a pretrained one."""
    if cfg.pretrained:
        return load_unet(cfg.pretrained)
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dataclasses.asdict(cfg).items()
                 if k not in ("preset", "pretrained") and v is not None}
    overrides.update(in_channels=latent_channels, out_channels=latent_channels, sample_size=sample_size,
                     cross_attention_dim=cross_attention_dim)
    return UNet2DConditionModel(**unet_config(cfg.preset, **overrides))


def load_unet(path: str | Path) -> UNet2DConditionModel:
    path = Path(path)
    if (path / "unet" / "config.json").exists():
        path = path / "unet"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a UNet2DConditionModel directory (no config.json)")
    return UNet2DConditionModel.from_pretrained(path, local_files_only=True)
