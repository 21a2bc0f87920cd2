"""A tiny StableDiffusionPipeline directory for the viz and app tests (import the fixture).

Random weights from the tiny presets: 32 px images (8x8x4 latents through tiny-f4), so a
25-step generation takes well under a second on one CPU core. Saved with diffusers'
`save_pretrained`, so it is loaded by the same `ldm.infer.load_pipeline` a trained one is.
"""

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from ldm.diffusion import scheduler_config
from ldm.models.presets import unet_config, vae_config
from ldm.models.text import build_text_encoder, build_tokenizer
from ldm.viz import noise_config

TINY_SIZE = 32  # pixels: 8x8 latents (unet "tiny") through the f4 VAE


def save_tiny_pipeline(path: Path, zero_terminal_snr: bool = False) -> Path:
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config("tiny-f4")),
        text_encoder=build_text_encoder("tiny"),
        tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel(**unet_config("tiny")),
        scheduler=DDPMScheduler.from_config(scheduler_config(noise_config("scaled_linear", zero_terminal_snr))),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline"))
