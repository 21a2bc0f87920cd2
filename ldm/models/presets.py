"""Named model sizes: diffusers config kwargs for the UNet, the KL-VAE and the SD noise schedule.

Each preset is a plain dict that `UNet2DConditionModel(**cfg)` / `AutoencoderKL(**cfg)`
accept as it is. `unet_config(name, **overrides)` and `vae_config(name, **overrides)` return a
copy with overrides applied, and reject an unknown preset name or a key the model's
constructor does not take, naming it, so a typo fails before any model is built.

The "sd15", "sd2", "sd2-base" and "kl-f8" presets are the published Stable Diffusion configs
(the `config.json` files of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1
[-base]); `ldm.export` relies on that to import original single-file checkpoints.
"""

from __future__ import annotations

import inspect

from diffusers import AutoencoderKL, UNet2DConditionModel

# Every UNet preset spells out the same keys, so two presets differ only where they say so.
UNET_PRESETS: dict[str, dict] = {
    # For tests: 0.8 M parameters, 8x8 latents, one attention level.
    "tiny": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 8,        # diffusers' legacy name: the number of heads
        "norm_num_groups": 8,
        "use_linear_projection": False,
        "upcast_attention": False,
    },
    # Trains on one GPU in minutes: 32x32 latents (256 px through kl-f8).
    "small": {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (128, 256, 256),
        "layers_per_block": 2,
        "cross_attention_dim": 256,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "use_linear_projection": False,
        "upcast_attention": False,
    },
    # Stable Diffusion 1.x: CLIP ViT-L/14 text features (768), 8 heads, 64x64 latents (512 px).
    "sd15": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
        "use_linear_projection": False,
        "upcast_attention": False,
    },
    # Stable Diffusion 2.1 (768-v): OpenCLIP ViT-H features (1024), 64-channel heads, 96x96 latents.
    "sd2": {
        "sample_size": 96,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "upcast_attention": True,       # 2.1-v overflows in fp16 attention without it
    },
    # Stable Diffusion 2.x base (512 px, epsilon prediction).
    "sd2-base": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "norm_num_groups": 32,
        "use_linear_projection": True,
        "upcast_attention": False,
    },
}

# The kl-fN names follow the LDM paper (Rombach et al. 2022, tab. 8): N is the spatial
# downsampling factor, 2 ** (levels - 1). All use 4 latent channels so that they compose with
# every UNet preset; the paper's kl-f4 had 3 and kl-f16 had 16 (override latent_channels).
# diffusers' AutoencoderKL has attention only in its middle block, as kl-f4/kl-f8 do.
VAE_PRESETS: dict[str, dict] = {
    "tiny-f4": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (8, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    "tiny-f8": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (8, 16, 16, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
    },
    "kl-f2": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (128, 256),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
    },
    "kl-f4": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (128, 256, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
    },
    # The Stable Diffusion VAE, key for key.
    "kl-f8": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,      # SD's measured value; our stage 1 measures its own
    },
    "kl-f16": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 5,
        "up_block_types": ("UpDecoderBlock2D",) * 5,
        "block_out_channels": (128, 128, 256, 256, 512),
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 256,
    },
}

# The DDPM noise schedule Stable Diffusion 1.x/2.x was trained with (DDPMScheduler kwargs):
# "scaled_linear" is linear in sqrt(beta) between these ends, over 1000 steps.
SD_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}


def unet_config(preset: str, **overrides) -> dict:
    """The named UNet2DConditionModel config with `overrides` applied."""
    return _resolve("UNet", UNET_PRESETS, UNet2DConditionModel, preset, overrides)


def vae_config(preset: str, **overrides) -> dict:
    """The named AutoencoderKL config with `overrides` applied.

    A new `block_out_channels` sets the number of levels, so the block types follow its length
    unless they are overridden too.
    """
    if "block_out_channels" in overrides:
        levels = len(overrides["block_out_channels"])
        overrides.setdefault("down_block_types", ("DownEncoderBlock2D",) * levels)
        overrides.setdefault("up_block_types", ("UpDecoderBlock2D",) * levels)
    return _resolve("VAE", VAE_PRESETS, AutoencoderKL, preset, overrides)


def _resolve(kind: str, presets: dict[str, dict], model_cls: type, preset: str, overrides: dict) -> dict:
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; known: {sorted(presets)}")
    accepted = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"{kind} preset {preset!r}: {model_cls.__name__} takes no config key(s) {unknown}")
    return {**presets[preset], **overrides}
