"""Tiny stage-3 runs shared by test_reliability.py and test_multiprocess.py: the settings, a latent
cache to train on, and every tensor a finished run leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from ldm.config import load_config
from ldm.train.encode import EncodeConfig, encode_dataset
from ldm.models.presets import vae_config
from ldm.train.common import list_checkpoints
from ldm.train.ldm import LDMTrainConfig

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

# Stage 3 on the latents of a random tiny VAE (16 px images, 4x4x4 latents): warm-up then cosine
# LR, EMA, min-SNR weights, caption dropout: every piece of state a resume must bring back.
LDM = ["model.block_out_channels=[16, 32]", "model.down_block_types=[CrossAttnDownBlock2D, DownBlock2D]",
       "model.up_block_types=[UpBlock2D, CrossAttnUpBlock2D]", "model.attention_head_dim=8", "model.norm_num_groups=8",
       "model.layers_per_block=1", "text.encoder=tiny", "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=2",
       "train.lr_schedule=cosine", "train.ema_decay=0.9", "train.log_every=1", "train.save_every=1", "train.steps=8",
       "noise.snr_gamma=5.0", "caption_dropout=0.3", "validation.prompts=[]", "validation.held_out_batches=1"]


def ldm_args(out_dir: Path, data: dict, *overrides: str) -> list[str]:
    return [f"out_dir={out_dir}", f"cache={data['cache']}", f"vae={data['vae']}", *LDM, *overrides]


def ldm_cfg(out_dir: Path, data: dict, *overrides: str) -> LDMTrainConfig:
    return load_config(LDMTrainConfig, None, ldm_args(out_dir, data, *overrides))


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> dict:
    """A random tiny VAE and the latent cache it made of 16 px shapes."""
    root = tmp_path_factory.mktemp("latents")
    torch.manual_seed(0)
    AutoencoderKL(**vae_config("tiny-f4", scaling_factor=0.5)).save_pretrained(root / "vae")
    cfg = load_config(EncodeConfig, None, [f"vae={root / 'vae'}", f"out_dir={root / 'cache'}", "data.source.kind=shapes",
                                           "data.source.size=32", "data.source.resolution=16",
                                           "data.transform.resolution=16", "data.eval_size=4", "shard_size=32"])
    return {"vae": root / "vae", "cache": encode_dataset(cfg)}


def tensors_of(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor a run leaves: its export (EMA weights) and its last checkpoint's weights, EMA
    and LR schedule."""
    files = list(run.glob("vae/*.safetensors")) + list(run.glob("pipeline/*/*.safetensors"))
    files += list(list_checkpoints(run)[-1].glob("*.safetensors"))
    return {f"{p.relative_to(run)}:{k}": v for p in sorted(files) for k, v in load_file(p).items()}
