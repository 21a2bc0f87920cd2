"""Which text encoder conditions the U-Net: a preset (random, frozen), a local CLIP, or OpenCLIP."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ldm.config import ConfigError, require
from ldm.models.paths import model_path_problem
from ldm.models.text import (EOS_TOKEN, TEXT_PRESETS, build_text_encoder, build_tokenizer, load_openclip_text_encoder,
                             load_text_encoder, openclip_model_config)


@dataclasses.dataclass
class TextEncoderConfig:
    encoder: str = "tiny"          # a preset (tiny|small|sd15|sd2: random init, frozen) or a local CLIPTextModel /
                                   # SD pipeline / trained-CLIP directory (train_clip.py output), or SD .safetensors
    openclip_checkpoint: str = ""  # a local open_clip checkpoint (SD-2.x style); converted to a CLIPTextModel.
                                   # Set, it replaces `encoder` (leave that unset)
    openclip_model: str = "ViT-H-14"  # its architecture: an open_clip model name, or the path of its model config JSON
    clip_skip: int = 0             # 0: last layer; k: k layers before the last (+ final LayerNorm)
    seed: int = 0                  # init seed of a preset encoder
    pad_token: str = EOS_TOKEN     # SD-1.x pads with <|endoftext|>, SD-2.x with "!"
    max_length: int = 77           # tokens per prompt (padded/truncated); shorter = cheaper cross-attention

    def validate(self) -> None:
        require(self.clip_skip >= 0, "text.clip_skip must be >= 0")
        require(2 <= self.max_length <= 77, f"text.max_length must be in [2, 77], got {self.max_length}")
        if self.openclip_checkpoint:
            require(self.encoder in ("", type(self).encoder),
                    f"text.encoder={self.encoder!r} and text.openclip_checkpoint are both set; set one of them")
            require(Path(self.openclip_checkpoint).is_file(), f"text.openclip_checkpoint: no such file {self.openclip_checkpoint!r}")
            try:
                openclip_model_config(self.openclip_model)
            except (ValueError, OSError) as err:
                raise ConfigError(f"text.openclip_model: {err}") from None
        elif self.encoder not in TEXT_PRESETS:
            problem = model_path_problem(self.encoder)
            require(problem is None, f"text.encoder {self.encoder!r} is not a preset ({', '.join(TEXT_PRESETS)}): {problem}")


def load_text(cfg: TextEncoderConfig):
    """(CLIPTextModel, CLIPTokenizer), frozen."""
    if cfg.encoder in TEXT_PRESETS and not cfg.openclip_checkpoint:
        return build_text_encoder(cfg.encoder, seed=cfg.seed), build_tokenizer(cfg.max_length, pad_token=cfg.pad_token)
    if cfg.openclip_checkpoint:
        model, tokenizer = load_openclip_text_encoder(cfg.openclip_checkpoint, cfg.openclip_model)
    else:
        model, tokenizer = load_text_encoder(cfg.encoder, pad_token=cfg.pad_token)
    # prompts padded to text.max_length, never past the positions the encoder has
    tokenizer.model_max_length = min(cfg.max_length, tokenizer.model_max_length)
    return model, tokenizer
