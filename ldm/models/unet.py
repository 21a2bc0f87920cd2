"""Build or load the text-conditioned U-Net (diffusers' UNet2DConditionModel).

A fresh U-Net comes from a named preset (`ldm.models.presets.UNET_PRESETS`: tiny for tests,
small for a GPU in minutes, sd15 and sd2 for the Stable Diffusion sizes), sized for the VAE's
latent channels and the text encoder's width. A fine-tune loads the `unet/` of a Stable
Diffusion diffusers directory or of our own pipeline directory (or a bare U-Net directory).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

from diffusers import UNet2DConditionModel

from ldm.config import require
from ldm.models.presets import UNET_PRESETS, unet_config
from ldm.models.paths import directory_only, model_path_problem

ARCHITECTURE_KEYS = ("block_out_channels", "layers_per_block", "attention_head_dim", "down_block_types",
                     "up_block_types", "transformer_layers_per_block", "norm_num_groups", "only_cross_attention",
                     "addition_embed_type", "addition_embed_type_num_heads")


@dataclasses.dataclass
class UNetModelConfig:
    preset: str = "tiny"                         # tiny | small | sd15 | sd2 | sd2-base (ignored with pretrained)
    pretrained: str = ""                         # fine-tune: an SD diffusers dir, our pipeline dir, a U-Net dir, or an
                                                 # SD .safetensors file; a pipeline (dir or file) also gives the text
                                                 # encoder, VAE and noise schedule
    block_out_channels: list[int] | None = None  # None: the preset's
    layers_per_block: int | None = None
    attention_head_dim: int | None = None
    down_block_types: list[str] | None = None
    up_block_types: list[str] | None = None
    transformer_layers_per_block: int | None = None
    norm_num_groups: int | None = None           # GroupNorm groups; must divide every width
    only_cross_attention: list[bool] | None = None  # per down block (the up blocks mirror it): True makes that
                                                    # level's attention cross-attention only, no self-attention
    addition_embed_type: str | None = None       # "text": the caption, attention-pooled, is added to the timestep's
                                                 # embedding (DeepFloyd IF's global text conditioning), beside the
                                                 # cross-attention; diffusers computes it from the same text states
    addition_embed_type_num_heads: int | None = None  # the pooling's heads (must divide the text width; diffusers: 64)

    def validate(self) -> None:
        if self.pretrained:
            problem = model_path_problem(self.pretrained)
            require(problem is None, f"model.pretrained: {problem}")
            changed = [f"model.{k}" for k in ARCHITECTURE_KEYS if getattr(self, k) is not None]
            require(not changed, f"{', '.join(changed)}: a fine-tuned U-Net keeps the architecture of "
                    f"model.pretrained={self.pretrained!r}; remove these keys")
        else:
            require(self.preset in UNET_PRESETS, f"model.preset {self.preset!r} is not one of {sorted(UNET_PRESETS)}")
            widths = self.block_out_channels or UNET_PRESETS[self.preset]["block_out_channels"]
            groups = self.norm_num_groups or UNET_PRESETS[self.preset]["norm_num_groups"]
            require(all(w % groups == 0 for w in widths),
                    f"model.norm_num_groups={groups} must divide every width of model.block_out_channels={list(widths)}")
            require(self.addition_embed_type in (None, "text"),
                    f"model.addition_embed_type {self.addition_embed_type!r}: only 'text' (a pooled caption added to "
                    f"the timestep embedding) needs no inputs beyond the text states")


def build_unet(cfg: UNetModelConfig, latent_channels: int, sample_size: int | tuple[int, int],
               cross_attention_dim: int, num_class_embeds: int | None = None) -> UNet2DConditionModel:
    """A fresh U-Net sized for the VAE's latents and the text encoder's width, or the pretrained one
    (checked to fit them). `sample_size` (latent px, int or (h, w)) is the size it generates by default.
    `num_class_embeds`: a class-conditional U-Net's learned class embeddings (added to the timestep's)."""
    if cfg.pretrained:
        unet = load_unet(cfg.pretrained)
        check_fits(unet, latent_channels, cross_attention_dim, cfg.pretrained)
        unet.register_to_config(sample_size=sample_size)  # the training size, whatever the original's was
        return unet
    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k in ARCHITECTURE_KEYS if (v := getattr(cfg, k)) is not None}
    if cfg.addition_embed_type:
        heads = cfg.addition_embed_type_num_heads or inspect.signature(UNet2DConditionModel).parameters[
            "addition_embed_type_num_heads"].default
        require(cross_attention_dim % heads == 0, f"model.addition_embed_type_num_heads={heads} must divide the text "
                f"encoder's width {cross_attention_dim}")
    overrides.update(in_channels=latent_channels, out_channels=latent_channels, sample_size=sample_size,
                     cross_attention_dim=cross_attention_dim, num_class_embeds=num_class_embeds)
    return UNet2DConditionModel(**unet_config(cfg.preset, **overrides))


def check_fits(unet: UNet2DConditionModel, latent_channels: int, cross_attention_dim: int, source: str) -> None:
    """A pretrained U-Net must read these latents and this text encoder's features."""
    if unet.config.in_channels != latent_channels or unet.config.out_channels != latent_channels:
        raise ValueError(f"{source}: the U-Net takes {unet.config.in_channels}-channel latents, the cache holds "
                         f"{latent_channels}-channel ones (encode with the pipeline's VAE)")
    if unet.config.cross_attention_dim != cross_attention_dim:
        raise ValueError(f"{source}: the U-Net's cross_attention_dim is {unet.config.cross_attention_dim}, the text "
                         f"encoder gives {cross_attention_dim}-dim features (use the pipeline's text encoder)")


def downsampling(unet: UNet2DConditionModel) -> int:
    """What latent sides must be divisible by: one halving per down block but the last."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def load_unet(path: str | Path) -> UNet2DConditionModel:
    """A UNet2DConditionModel directory, or the `unet/` of a Stable Diffusion pipeline directory."""
    path = directory_only(path, "load_unet")
    if (path / "unet" / "config.json").exists():
        path = path / "unet"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a UNet2DConditionModel directory (no config.json)")
    return UNet2DConditionModel.from_pretrained(path, local_files_only=True)
