"""Text conditioning: the CLIP tokenizer (built offline), CLIP text encoders, prompt encoding.

Everything here speaks transformers' formats (`CLIPTokenizer`, `CLIPTextModel`), because
that is what a diffusers `StableDiffusionPipeline` directory holds under `tokenizer/` and
`text_encoder/`. OpenCLIP text towers (the SD-2.x conditioner) are converted into a
`CLIPTextModel` so that a single code path encodes prompts for both families.

Conventions (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models", and the released SD code):
  - SD-1.x: OpenAI CLIP ViT-L/14 text tower, tokens padded with <|endoftext|> (id 49407),
    conditioning = the last layer's hidden states after the final LayerNorm.
  - SD-2.x: OpenCLIP ViT-H/14 text tower, padded with "!" (id 0, as `open_clip.tokenize`
    pads with zeros), conditioning = the *penultimate* layer after the final LayerNorm; the
    diffusers release stores this as a 23-layer `CLIPTextModel` (the 24th layer dropped).
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.tokenizer import bytes_to_unicode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.models.paths import directory_only
from ldm.safetensors_io import load_safetensors

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

# OpenAI's SimpleTokenizer keeps the first 49152 - 256 - 2 merges of the shipped BPE file, so
# that 256 byte tokens + 256 end-of-word byte tokens + merges + 2 specials = 49408 ids.
_NUM_MERGES = 49152 - 256 - 2

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=CONTEXT_LENGTH,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,  # pooling takes the first <|endoftext|>, as CLIP's argmax does
    pad_token_id=EOS_ID,
)

# CLIPTextConfig kwargs. sd15 is OpenAI CLIP ViT-L/14's text tower; sd2 is OpenCLIP ViT-H/14's
# with its last layer dropped (see module docstring).
TEXT_PRESETS: dict[str, dict] = {
    "tiny": dict(_COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=256, projection_dim=64, hidden_act="quick_gelu"),
    "small": dict(_COMMON, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, projection_dim=256, hidden_act="quick_gelu"),
    "sd15": dict(_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, projection_dim=768, hidden_act="quick_gelu"),
    "sd2": dict(_COMMON, hidden_size=1024, num_hidden_layers=23, num_attention_heads=16,
                intermediate_size=4096, projection_dim=512, hidden_act="gelu"),
}


# --------------------------------------------------------------------------- tokenizer


def _clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary and merge list exactly as OpenAI's `SimpleTokenizer.__init__` builds them."""
    lines = gzip.open(open_clip.tokenizer.default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a header
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"the BPE file {open_clip.tokenizer.default_bpe()} gave {len(vocab)} "
                           f"distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def build_tokenizer(max_length: int = CONTEXT_LENGTH, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """The CLIP BPE tokenizer, built offline from the vocabulary open_clip_torch ships.

    Gives the ids of OpenAI's / open_clip's SimpleTokenizer (49408 tokens, <|startoftext|> =
    49406, <|endoftext|> = 49407; truncation keeps <|endoftext|> as the last token).
    `pad_token`: "<|endoftext|>" for SD-1.x, "!" (id 0) for SD-2.x / OpenCLIP.

    Unlike open_clip, transformers' tokenizer does not run `ftfy.fix_text` and
    `html.unescape` on the text first, so text those would change (HTML entities, curly
    quotes, mojibake) tokenizes differently; every SD pipeline in diffusers shares that.
    """
    vocab, merges = _clip_bpe_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not a token of the CLIP vocabulary "
                         f"(use {EOS_TOKEN!r} for SD-1.x or '!' for SD-2.x)")
    with tempfile.TemporaryDirectory() as tmp:
        # Files rather than in-memory vocab: both the slow (transformers 4) and the
        # tokenizers-backed (transformers 5) CLIPTokenizer load this layout.
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=max_length, pad_token=pad_token,
            # important: text is never matched against special tokens, as in open_clip. Else
            # pad "!" becomes a special token and every "!" in a prompt turns into a bare id 0
            # (the SD-2.x tokenizer quirk of diffusers issue #4153).
            split_special_tokens=True)
    return tokenizer


# --------------------------------------------------------------------------- encoders


def _freeze(model: CLIPTextModel) -> CLIPTextModel:
    model.eval()
    model.requires_grad_(False)
    return model


def _text_transformer(model: CLIPTextModel) -> torch.nn.Module:
    """The module holding embeddings/encoder/final_layer_norm: `model.text_model` before
    transformers 5, the model itself from 5 on (diffusers 0.42's clip_skip path still
    assumes the former and raises AttributeError on transformers 5)."""
    return getattr(model, "text_model", model)


def without_skipped_layers(text_encoder: CLIPTextModel, clip_skip: int) -> CLIPTextModel:
    """A copy of `text_encoder` without its last `clip_skip` layers, whose plain output is
    `encode_prompts(text_encoder, ..., clip_skip=clip_skip)`: an export made this way gives the
    conditioning the U-Net was trained on in any pipeline, which needs no clip_skip argument
    (plain diffusers' own clip_skip path fails on transformers 5, see `_text_transformer`)."""
    if clip_skip == 0:
        return text_encoder
    config = text_encoder.config
    if not 0 < clip_skip <= config.num_hidden_layers:
        raise ValueError(f"clip_skip={clip_skip} must be in [0, {config.num_hidden_layers}]")
    shorter = copy.deepcopy(text_encoder)
    encoder = _text_transformer(shorter).encoder
    encoder.layers = encoder.layers[: config.num_hidden_layers - clip_skip]
    shorter.config.num_hidden_layers = len(encoder.layers)
    return shorter


def build_text_encoder(preset: str = "tiny", seed: int = 0) -> CLIPTextModel:
    """A randomly initialised CLIPTextModel from TEXT_PRESETS (same seed, same weights), frozen."""
    if preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text encoder preset {preset!r}; choose one of {sorted(TEXT_PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS[preset]))
    return _freeze(model)


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


def load_text_encoder(path: str | os.PathLike, pad_token: str = EOS_TOKEN
                      ) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Load a frozen CLIPTextModel and its tokenizer from a local directory, never the hub.

    `path` is either a diffusers pipeline directory (with `text_encoder/` and usually
    `tokenizer/`) or a plain CLIPTextModel directory (`config.json` + weights); a stage resolves
    an SD single file to its directory first (`ldm.single_file.resolve_models`). When no
    tokenizer is saved there, the offline one is built, padding with `pad_token`.
    """
    root = directory_only(path, "load_text_encoder")
    model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{root} is neither a pipeline directory with text_encoder/ nor a "
                                f"CLIPTextModel directory: no {model_dir / 'config.json'}")
    model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
    tok_dir = next((d for d in (root / "tokenizer", model_dir) if _has_tokenizer_files(d)), None)
    if tok_dir is None:
        tokenizer = build_tokenizer(model.config.max_position_embeddings, pad_token)
    else:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    return _freeze(model), tokenizer


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str],
                   clip_skip: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Cross-attention conditioning for `prompts`: (B, model_max_length, hidden_size).

    clip_skip=0 is the last layer's output after the final LayerNorm (SD-1.x). clip_skip=k
    takes the output k layers before the last and applies the final LayerNorm to it, which
    is what diffusers' `StableDiffusionPipeline.encode_prompt(clip_skip=k)` does, so both
    give the same tensor. clip_skip=num_layers is the token and position embeddings alone, under
    the final LayerNorm: each token's vector then says only its word and place, not its neighbours.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str")
    num_layers = text_encoder.config.num_hidden_layers
    if not 0 <= clip_skip <= num_layers:
        raise ValueError(f"clip_skip={clip_skip} must be in [0, {num_layers}] for this "
                         f"{num_layers}-layer text encoder")
    device = text_encoder.device if device is None else torch.device(device)
    # The padding and truncation of diffusers' pipelines: always the full context length.
    batch = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt")
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):  # as diffusers does
        attention_mask = batch.attention_mask.to(device)
    out = text_encoder(batch.input_ids.to(device), attention_mask=attention_mask,
                       output_hidden_states=clip_skip > 0)
    if clip_skip == 0:
        return out.last_hidden_state
    return _text_transformer(text_encoder).final_layer_norm(out.hidden_states[-(clip_skip + 1)])


# --------------------------------------------------------------------------- OpenCLIP


def _text_tower_state(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower's tensors with their prefix removed, from any open_clip-style state dict.

    The prefix is found from `token_embedding.weight`: "" for open_clip.CLIP, "text." for
    CustomTextCLIP, "module." for DDP checkpoints, "cond_stage_model.model." for SD-2 .ckpt.
    """
    hits = [k for k in state_dict if k.endswith("token_embedding.weight") and "visual" not in k]
    if len(hits) != 1:
        raise ValueError(f"expected one text tower (a '...token_embedding.weight' key) in the state "
                         f"dict, found {len(hits)}: {hits[:4]}")
    prefix = hits[0][: -len("token_embedding.weight")]
    not_text = ("visual.", "logit_scale", "logit_bias", "attn_mask")  # beside the tower in CLIP
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith(not_text)}


def _check_supported_text_cfg(text_cfg: Mapping) -> None:
    """Refuse OpenCLIP text options that change the computation without adding a weight.

    (Options that add weights, such as layer scale or qk-norm, are caught by the conversion
    finding tensors it does not map.)
    """
    if text_cfg.get("no_causal_mask", False):
        raise ValueError("OpenCLIP text tower without a causal mask (no_causal_mask=True) has no "
                         "CLIPTextModel equivalent: CLIPTextModel always masks causally")
    if text_cfg.get("pool_type", "argmax") not in ("argmax", "eos"):
        raise ValueError(f"OpenCLIP text pool_type {text_cfg['pool_type']!r} is not CLIP's "
                         "end-of-text pooling")


def _model_cfg_of(model: torch.nn.Module) -> dict:
    """The parts of an open_clip model config the conversion needs, read off a built model."""
    tower = getattr(model, "text", model)  # CustomTextCLIP keeps the text tower in .text
    block = tower.transformer.resblocks[0]
    return {
        "quick_gelu": isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU),
        "text_cfg": {"heads": block.attn.num_heads, "no_causal_mask": tower.attn_mask is None,
                     "pool_type": getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))},
    }


def openclip_to_clip_text_model(source: torch.nn.Module | Mapping[str, torch.Tensor],
                                model_cfg: Mapping | None = None,
                                drop_last_layers: int = 0) -> CLIPTextModel:
    """Convert an OpenCLIP text tower into a transformers CLIPTextModel with equal hidden states.

    `source` is an open_clip model, or its state dict together with `model_cfg` (an open_clip
    model config: {"embed_dim", "quick_gelu", "text_cfg": {"heads", ...}, ...}; needed because
    a state dict does not say how many heads there are). `drop_last_layers=1` gives SD-2.x's
    "penultimate" conditioning as the converted model's `last_hidden_state`.

    OpenCLIP packs q, k, v into one `in_proj` matrix (torch.nn.MultiheadAttention); CLIPTextModel
    keeps three Linear layers, so it is split in thirds in q, k, v order.
    """
    if isinstance(source, torch.nn.Module):
        model_cfg = _model_cfg_of(source) if model_cfg is None else model_cfg
        state = _text_tower_state(source.state_dict())
    else:
        if model_cfg is None:
            raise ValueError("converting an OpenCLIP state dict needs model_cfg (its open_clip "
                             "model config) for the number of heads and the activation")
        state = _text_tower_state(source)
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    _check_supported_text_cfg(text_cfg)

    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    keep = num_layers - drop_last_layers
    if not 0 < keep <= num_layers:
        raise ValueError(f"drop_last_layers={drop_last_layers} leaves no layers of {num_layers}")
    vocab_size, width = state["token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=keep,
        num_attention_heads=int(text_cfg.get("heads", 8)),  # 8: open_clip's CLIPTextCfg default
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        max_position_embeddings=state["positional_embedding"].shape[0],
        projection_dim=state["text_projection"].shape[-1] if "text_projection" in state else width,
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=1e-5,  # torch.nn.LayerNorm's default, which open_clip uses
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=0,
    )
    mapping = {  # CLIPTextModel name (under .text_model before transformers 5) -> OpenCLIP name
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            mapping |= {dst + f"self_attn.out_proj.{kind}": src + f"attn.out_proj.{kind}",
                        dst + f"layer_norm1.{kind}": src + f"ln_1.{kind}",
                        dst + f"layer_norm2.{kind}": src + f"ln_2.{kind}",
                        dst + f"mlp.fc1.{kind}": src + f"mlp.c_fc.{kind}",
                        dst + f"mlp.fc2.{kind}": src + f"mlp.c_proj.{kind}"}
    unmapped = {k for k in state if not k.startswith("text_projection")} - set(mapping.values()) - {
        f"transformer.resblocks.{i}.attn.in_proj_{kind}" for i in range(num_layers) for kind in ("weight", "bias")}
    if unmapped:  # e.g. layer scale, qk-norm, a class token: no CLIPTextModel counterpart
        raise ValueError(f"OpenCLIP text tower has tensors CLIPTextModel cannot hold: {sorted(unmapped)[:6]}")

    converted = {dst: state[src] for dst, src in mapping.items()
                 if not dst.startswith("encoder.layers.") or int(dst.split(".")[2]) < keep}
    for i in range(keep):
        for kind in ("weight", "bias"):
            q, k, v = state[f"transformer.resblocks.{i}.attn.in_proj_{kind}"].chunk(3, dim=0)
            dst = f"encoder.layers.{i}.self_attn."
            converted |= {dst + f"q_proj.{kind}": q, dst + f"k_proj.{kind}": k, dst + f"v_proj.{kind}": v}
    model = CLIPTextModel(config)
    missing, unexpected = _text_transformer(model).load_state_dict(  # in fp32, whatever the source's dtype
        {k: v.detach().float().clone() for k, v in converted.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise RuntimeError(f"OpenCLIP conversion left missing={missing} unexpected={unexpected}")
    return _freeze(model)


def _load_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    """Weights from .safetensors, or a pickled .bin/.pt/.ckpt with weights_only=True."""
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def openclip_model_config(model: str | os.PathLike | Mapping) -> dict:
    """An open_clip model config from an architecture name ("ViT-H-14"), a JSON file, or a dict.

    The JSON file is open_clip's own format: a `model_configs/*.json` file ({"embed_dim",
    "vision_cfg", "text_cfg", ...}), or an `open_clip_config.json` that holds one under "model_cfg".
    """
    if isinstance(model, Mapping):
        return dict(model)
    if str(model).endswith(".json") or Path(model).is_file():
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no open_clip model config at {path}")
        cfg = json.loads(path.read_text())
        cfg = cfg.get("model_cfg", cfg)
        if not isinstance(cfg, dict) or "text_cfg" not in cfg:
            raise ValueError(f"{path} is not an open_clip model config: no 'text_cfg' (nor 'model_cfg.text_cfg')")
        return cfg
    cfg = open_clip.get_model_config(str(model))
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {str(model)!r}; name one of open_clip.list_models() "
                         f"or give the path of its model config JSON")
    return cfg


def load_openclip_text_encoder(checkpoint_path: str | os.PathLike, model_name_or_cfg: str | os.PathLike | Mapping,
                               layer: Literal["last", "penultimate"] = "penultimate",
                               pad_token: str = "!") -> tuple[CLIPTextModel, CLIPTokenizer]:
    """Load a local open_clip checkpoint's text tower as a CLIPTextModel plus tokenizer.

    `model_name_or_cfg`: an open_clip built-in architecture name ("ViT-H-14"), the path of a
    model config JSON, or a model config dict (see `openclip_model_config`).
    `layer="penultimate"` is SD-2.x's conditioning; `pad_token="!"` matches
    `open_clip.tokenize`'s zero padding.
    """
    if layer not in ("last", "penultimate"):
        raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"no OpenCLIP checkpoint at {path}")
    model_cfg = openclip_model_config(model_name_or_cfg)
    model = openclip_to_clip_text_model(_load_state_dict(path), model_cfg,
                                        drop_last_layers=1 if layer == "penultimate" else 0)
    return model, build_tokenizer(model.config.max_position_embeddings, pad_token)
