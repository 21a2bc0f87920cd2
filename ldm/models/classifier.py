"""The noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4), and its directory.

`NoisyClassifier` is the encoder half of a U-Net, built from diffusers' own blocks: conv_in, the
sinusoidal timestep embedding, DownBlock2D resnet blocks, the attention mid block, then GroupNorm,
SiLU, mean pooling over space and a linear head (their "downsampling trunk of the UNet with an
attention pool"; mean pooling here). It reads a noised latent x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
and its timestep t, and gives class logits; any latent size (the pooling is global).

A classifier directory (ldm.train.classifier writes it, `load_classifier` reads it):

    config.json, diffusion_pytorch_model.safetensors   ModelMixin.save_pretrained of the model
    classifier.json    {"format": "ldm-classifier", "version": 1, "classes": [...], "labels": spec,
                       "vae": vae_identity of the latents it was trained on (hash, scaling_factor,
                       shift_factor), "noise_schedule": the training scheduler config (the diffusion
                       model it guides must share it), "train_config": ..., "eval": per-noise-level accuracy}

The VAE is checked as the latent cache checks it: a classifier trained on another VAE's latents
judges latents it never saw, so `load_classifier(expect_vae=...)` refuses it, naming both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block

from ldm.atomic import write_atomic

FORMAT, VERSION, RECORD = "ldm-classifier", 1, "classifier.json"


class ClassifierFormatError(ValueError):
    """A classifier directory this ldm cannot use: another format or version, or another VAE's latents."""


class NoisyClassifier(ModelMixin, ConfigMixin):
    """Class logits of a noised latent x_t at timestep t (module docstring)."""

    @register_to_config
    def __init__(self, in_channels: int = 4, num_classes: int = 4, block_out_channels: tuple[int, ...] = (32, 64, 128),
                 layers_per_block: int = 1, norm_num_groups: int = 8, attention_head_dim: int = 8):
        super().__init__()
        width, temb = block_out_channels[0], block_out_channels[0] * 4
        self.conv_in = torch.nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)  # as UNet2DConditionModel
        self.time_embedding = TimestepEmbedding(width, temb)
        blocks, channels = [], width
        for i, out in enumerate(block_out_channels):
            blocks.append(get_down_block("DownBlock2D", num_layers=layers_per_block, in_channels=channels, out_channels=out,
                                         temb_channels=temb, add_downsample=i < len(block_out_channels) - 1,
                                         resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=norm_num_groups,
                                         downsample_padding=1, attention_head_dim=attention_head_dim))
            channels = out
        self.down_blocks = torch.nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(in_channels=channels, temb_channels=temb, resnet_eps=1e-5, resnet_act_fn="silu",
                                        resnet_groups=norm_num_groups, attention_head_dim=attention_head_dim)
        self.norm_out = torch.nn.GroupNorm(norm_num_groups, channels)
        self.head = torch.nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = self.conv_in(x)
        for block in self.down_blocks:
            h, _ = block(h, emb)
        h = self.mid_block(h, emb)
        return self.head(F.silu(self.norm_out(h)).mean(dim=(2, 3)))


def save_classifier(model: NoisyClassifier, path: str | os.PathLike, record: dict) -> Path:
    """The model (safetensors) and its record classifier.json (module docstring)."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    write_atomic(path / RECORD, json.dumps({"format": FORMAT, "version": VERSION, **record}, indent=2))
    return path


def read_classifier_record(path: str | os.PathLike) -> dict:
    file = Path(path) / RECORD
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a classifier directory (no {RECORD}; train one with train_classifier.py)")
    record = json.loads(file.read_text())
    for key, want in (("format", FORMAT), ("version", VERSION)):
        if record.get(key) != want:
            raise ClassifierFormatError(f"{file}: key {key!r} is {record.get(key, '<missing>')!r}; this ldm reads "
                                        f"{FORMAT} version {VERSION}")
    return record


def vae_mismatch(record: dict, expect_vae: dict) -> list[str]:
    """One line per VAE identity key (ldm.data.cache.vae_identity) the classifier's latents differ in."""
    have = record.get("vae") or {}
    return [f"{k}: the classifier's latents have {have.get(k, '<missing>')!r}, this model's VAE {v!r}"
            for k, v in expect_vae.items() if have.get(k) != v]


def check_classifier_vae(record: dict, expect_vae: dict, where: str = "") -> None:
    """Refuse a classifier (its `record`) trained on latents of another VAE than `expect_vae`, naming both."""
    diffs = vae_mismatch(record, expect_vae)
    if diffs:
        raise ClassifierFormatError(f"the classifier {where} was trained on another VAE's latents:\n  " + "\n  ".join(diffs)
                                    + "\nTrain it on a latent cache encoded with this model's VAE.")


def load_classifier(path: str | os.PathLike, expect_vae: dict | None = None) -> tuple[NoisyClassifier, dict]:
    """(model in eval mode, record) of a classifier directory; with `expect_vae` (vae_identity of the
    VAE whose latents it will judge) a classifier trained on another VAE's latents is refused."""
    record = read_classifier_record(path)
    if expect_vae is not None:
        check_classifier_vae(record, expect_vae, str(path))
    model = NoisyClassifier.from_pretrained(path, use_safetensors=True)
    return model.eval().requires_grad_(False), record
