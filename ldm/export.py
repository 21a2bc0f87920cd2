"""Diffusers pipeline directory <-> original single-file Stable Diffusion checkpoint.

The single file is a `.safetensors` in the CompVis key layout that A1111, ComfyUI and
diffusers' `from_single_file` read:

    model.diffusion_model.*              the UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                  the KL-VAE (encoder.down.N / decoder.up.N, conv-shaped
                                         (C, C, 1, 1) attention weights)
    cond_stage_model.transformer.*       SD-1.x text encoder: transformers' CLIPTextModel
      or cond_stage_model.model.*        SD-2.x text encoder: an OpenCLIP text tower

Which text layout is written follows the encoder's activation: OpenAI's CLIP (SD-1.x) uses
quick_gelu, OpenCLIP towers (SD-2.x) use exact gelu, as diffusers' SD-2 text_encoder config
says. SD-2 readers condition on the penultimate block of the OpenCLIP tower, so the OpenCLIP
layout carries one block more than the CLIPTextModel has; that block is all zeros, which makes
it an exact identity (a pre-norm residual block whose output projections are zero), so a
reader taking the last block gets the same features too.

Like k-diffusion's exports, the configs travel inside the file, as JSON strings in the
safetensors metadata, so `import_single_file` needs nothing else:

    "ldm.format"        FORMAT_VERSION
    "ldm.unet"          UNet2DConditionModel config.json
    "ldm.vae"           AutoencoderKL config.json (with its measured scaling_factor)
    "ldm.text_encoder"  CLIPTextConfig
    "ldm.scheduler"     scheduler config.json (class, prediction type, schedule)
    "ldm.tokenizer"     {"pad_token", "model_max_length", "vocab_size"}
    "ldm.file.<name>"   the text of each `ldm*.json` file at the pipeline directory's root
                        (`ldm.pipeline`: its training record), carried unread

A reader refuses another "ldm.format", or a file missing one of the keys above, naming the file
and the key. This module is the single file's one writer (`export_single_file`) and one reader
(`load_checkpoint`, then `import_single_file`, or `single_file_configs` for the header alone).

Other readers never see that metadata, so the schedule also travels the ways they read it:

    "v_pred", "ztsnr"   empty tensors in the state dict of a v-prediction / zero-terminal-SNR
                        model: ComfyUI's model detection looks for these keys (today for
                        SDXL-shaped models only; it guesses SD-2's from the weights)
    <name>.yaml         beside a v-prediction file: the original LatentDiffusion inference config
                        with `parameterization: "v"` (as SD 2.x's v2-inference-v.yaml), which
                        A1111 and Forge load instead of guessing the config from the weights

(A1111 and Forge have no per-file zero-terminal-SNR switch: their "Zero Terminal SNR" noise
schedule setting does it.) The importer reads both keys back, with or without our metadata.

A file without that metadata (any SD-1.x/2.x checkpoint) imports too: the variant is read
from its keys and shapes, and the published SD configs fill in what shapes cannot tell
(`infer_configs`); the `configs` argument of `import_single_file` replaces any component's.

The original -> diffusers direction uses diffusers' own converters; diffusers ships none for
diffusers -> original, so that direction is written here as the exact inverse of them (the
round trip is tested tensor for tensor).
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
    is_clip_model,
    is_open_clip_model,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
import yaml
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.atomic import atomic_path, write_atomic
from ldm.models.presets import SD_SCHEDULER_CONFIG, unet_config, vae_config
from ldm.models.text import EOS_TOKEN, build_tokenizer
from ldm.pipeline import check_ldm_file_name, ldm_files, load_pipeline_dir, write_ldm_files
from ldm.safetensors_io import open_safetensors

FORMAT_VERSION = "1"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
COMPONENTS = ("unet", "vae", "text_encoder", "scheduler", "tokenizer")
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # schedule markers other readers look for (module docstring)
COMPANION_MARK = "# written by ldm.export beside its checkpoint: the web UIs' config for it\n"

# SD-2.x pads prompts with "!" (id 0), as open_clip.tokenize pads with zeros; SD-1.x with EOS.
_PAD_TOKEN = {"sd1": EOS_TOKEN, "sd2": "!"}
_OPEN_CLIP_HEAD_DIM = 64  # OpenAI ViT-L/14 text: 768 / 12 heads; OpenCLIP ViT-H/14: 1024 / 16

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


# --------------------------------------------------------------------------- diffusers -> original


def _rename(state_dict: Mapping[str, torch.Tensor], fixed: Mapping[str, str], rules: list[Rule],
            component: str) -> dict[str, torch.Tensor]:
    """Rename every key by `fixed` or the first matching rule; a key neither covers is an error,
    so no tensor is silently left out of the export."""
    out = {}
    for key, tensor in state_dict.items():
        if key in fixed:
            new = fixed[key]
        else:
            new = next((fn(m) for pattern, fn in rules if (m := pattern.fullmatch(key))), None)
        if new is None:
            raise ValueError(f"{component}: {key!r} has no place in the original SD layout "
                             "(a model option the single-file format does not hold)")
        if new in out:
            raise ValueError(f"{component}: two tensors map to {new!r}")
        out[new] = tensor
    return out


def _unet_resnet(rest: str) -> str:
    """diffusers ResnetBlock2D names -> the original ResBlock's (inverse of diffusers'
    update_unet_resnet_ldm_to_diffusers)."""
    head, _, tail = rest.partition(".")
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
             "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    if head not in names:
        raise ValueError(f"unet: resnet tensor {rest!r} has no place in the original ResBlock")
    return f"{names[head]}.{tail}"


def unet_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict in the CompVis `model.diffusion_model.*` layout.

    The original UNet numbers its blocks in one flat list per path: input block 0 is conv_in,
    then each level has `layers_per_block` (resnet, attention) blocks and one downsampler;
    each up level has `layers_per_block + 1` blocks, the last also holding the upsampler (at
    index 2 after an attention, else 1).
    """
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise ValueError(f"unet: layers_per_block={per_level!r}; the original layout needs one int")
    step = per_level + 1
    up_with_attention = {int(k.split(".")[1]) for k in state_dict if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    rules: list[Rule] = [
        (re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.0.{_unet_resnet(m[3])}"),
        (re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
         lambda m: f"input_blocks.{1 + int(m[1]) * step + int(m[2])}.1.{m[3]}"),
        (re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
         lambda m: f"input_blocks.{(int(m[1]) + 1) * step}.0.op.{m[2]}"),
        (re.compile(r"mid_block\.resnets\.(\d+)\.(.+)"),
         lambda m: f"middle_block.{2 * int(m[1])}.{_unet_resnet(m[2])}"),
        (re.compile(r"mid_block\.attentions\.0\.(.+)"), lambda m: f"middle_block.1.{m[1]}"),
        (re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"output_blocks.{int(m[1]) * step + int(m[2])}.0.{_unet_resnet(m[3])}"),
        (re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)"),
         lambda m: f"output_blocks.{int(m[1]) * step + int(m[2])}.1.{m[3]}"),
        (re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
         lambda m: f"output_blocks.{int(m[1]) * step + per_level}."
                   f"{2 if int(m[1]) in up_with_attention else 1}.conv.{m[2]}"),
    ]
    return {UNET_PREFIX + k: v for k, v in _rename(state_dict, fixed, rules, "unet").items()}


def _vae_attention(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """diffusers Attention -> the original AttnBlock, whose q/k/v/proj_out are 1x1 convs."""
    head, _, tail = rest.rpartition(".")
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    if head not in names:
        raise ValueError(f"vae: attention tensor {rest!r} has no place in the original AttnBlock")
    if tail == "weight" and head != "group_norm":
        tensor = tensor[:, :, None, None]
    return f"{names[head]}.{tail}", tensor


def vae_to_original(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict in the CompVis `first_stage_model.*` layout.

    The original decoder numbers its levels from the lowest resolution up (decoder.up.0 is the
    last to run), diffusers' up_blocks in running order, so up_blocks.i is up.{levels-1-i}.
    """
    last = len(config["block_out_channels"]) - 1
    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attention = re.compile(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)")
    rules: list[Rule] = [
        (re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"),
        (re.compile(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)"),
         lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
        (re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)"),
         lambda m: f"decoder.up.{last - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"),
        (re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)"),
         lambda m: f"decoder.up.{last - int(m[1])}.upsample.conv.{m[2]}"),
        (re.compile(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)"),
         lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"),
        (attention, lambda m: f"{m[1]}.mid.attn_1.{m[2]}"),  # names finished below, with the reshape
    ]
    renamed = _rename(state_dict, fixed, rules, "vae")
    out = {}
    for key, tensor in renamed.items():
        if ".mid.attn_1." in key:
            coder, rest = key.split(".mid.attn_1.")
            name, tensor = _vae_attention(rest, tensor)
            key = f"{coder}.mid.attn_1.{name}"
        out[VAE_PREFIX + key] = tensor.contiguous()
    return out


def _is_open_clip_shaped(config: CLIPTextConfig) -> bool:
    """OpenCLIP towers (SD-2.x) use exact gelu; OpenAI's CLIP (SD-1.x) uses quick_gelu."""
    return config.hidden_act == "gelu"


def _clip_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the file keeps it.
    return {CLIP_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in state_dict.items()}


def _open_clip_to_original(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> OpenCLIP text tower (inverse of diffusers' convert_open_clip_checkpoint),
    plus the zero identity block that stands for SD-2's unused last layer (module docstring)."""
    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"),
           "ln_final.bias": sd.pop("final_layer_norm.bias")}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            # OpenCLIP packs q, k, v into torch.nn.MultiheadAttention's in_proj, in that order.
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            out |= {f"{dst}{oc}.{kind}": sd.pop(f"{src}{hf}.{kind}") for hf, oc in names.items()}
    if sd:
        raise ValueError(f"text_encoder: {sorted(sd)[:4]} have no place in the OpenCLIP layout")
    first, pad = "transformer.resblocks.0.", f"transformer.resblocks.{num_layers}."
    out |= {k.replace(first, pad): torch.zeros_like(v) for k, v in out.items() if k.startswith(first)}
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def text_encoder_to_original(state_dict: Mapping[str, torch.Tensor], config: CLIPTextConfig
                             ) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict in the SD-1.x CLIP or SD-2.x OpenCLIP layout (module docstring)."""
    if _is_open_clip_shaped(config):
        return _open_clip_to_original(state_dict, config.num_hidden_layers)
    return _clip_to_original(state_dict)


# --------------------------------------------------------------------------- what other readers read


def schedule_markers(scheduler_config: Mapping) -> dict[str, torch.Tensor]:
    """The empty tensors that tell ComfyUI a model is v-prediction and zero-terminal-SNR."""
    markers = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        markers[V_PRED_KEY] = torch.tensor([])
    if scheduler_config.get("rescale_betas_zero_snr"):
        markers[ZTSNR_KEY] = torch.tensor([])
    return markers


# diffusers beta_schedule -> the original LatentDiffusion's (its "linear" is diffusers' scaled_linear)
_LDM_BETA_SCHEDULE = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}


def original_inference_config(pipe: StableDiffusionPipeline) -> dict:
    """The CompVis/Stability inference YAML (v1-inference.yaml, v2-inference-v.yaml) of this
    pipeline, written from its configs: what A1111 and Forge build the model from."""
    unet, vae, sched = pipe.unet.config, pipe.vae.config, pipe.scheduler.config
    widths = list(unet.block_out_channels)
    heads = unet.attention_head_dim  # an int is SD-1's head count; a list, SD-2's heads per level
    head_keys = ({"num_heads": heads} if isinstance(heads, int)
                 else {"num_heads": -1, "num_head_channels": widths[0] // heads[0]})
    sample_size = unet.sample_size if isinstance(unet.sample_size, int) else unet.sample_size[0]
    params = {
        **({"parameterization": "v"} if sched.get("prediction_type") == "v_prediction" else {}),
        "linear_start": sched.beta_start, "linear_end": sched.beta_end,
        "timesteps": sched.num_train_timesteps,
        "beta_schedule": _LDM_BETA_SCHEDULE.get(sched.beta_schedule, sched.beta_schedule),
        "num_timesteps_cond": 1, "log_every_t": 200, "first_stage_key": "jpg", "cond_stage_key": "txt",
        "image_size": sample_size, "channels": vae.latent_channels, "cond_stage_trainable": False,
        "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": vae.scaling_factor, "use_ema": False,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "use_checkpoint": False, "image_size": sample_size, "in_channels": unet.in_channels,
            "out_channels": unet.out_channels, "model_channels": widths[0],
            "attention_resolutions": [2**i for i, kind in enumerate(unet.down_block_types) if "CrossAttn" in kind],
            "num_res_blocks": unet.layers_per_block, "channel_mult": [w // widths[0] for w in widths], **head_keys,
            "use_spatial_transformer": True, "use_linear_in_transformer": bool(unet.use_linear_projection),
            "transformer_depth": unet.transformer_layers_per_block, "context_dim": unet.cross_attention_dim,
            "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": vae.latent_channels, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": vae.latent_channels, "resolution": vae.sample_size,
                         "in_channels": vae.in_channels, "out_ch": vae.out_channels,
                         "ch": vae.block_out_channels[0],
                         "ch_mult": [w // vae.block_out_channels[0] for w in vae.block_out_channels],
                         "num_res_blocks": vae.layers_per_block, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                               "params": {"freeze": True, "layer": "penultimate"}}
                              if _is_open_clip_shaped(pipe.text_encoder.config)
                              else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}),
    }
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def companion_yaml_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".yaml")


def write_companion_yaml(pipe: StableDiffusionPipeline, checkpoint: Path) -> Path | None:
    """`<name>.yaml` beside a v-prediction checkpoint (A1111/Forge read it: module docstring); for
    any other model, remove one an earlier export of ours left, which would make it sample as v."""
    path = companion_yaml_path(checkpoint)
    if pipe.scheduler.config.get("prediction_type") != "v_prediction":
        if path.is_file() and path.read_text().startswith(COMPANION_MARK):
            path.unlink()
        return None
    config = json.loads(json.dumps(original_inference_config(pipe)))  # tuples -> lists, as YAML writes them
    return write_atomic(path, COMPANION_MARK + yaml.safe_dump(config, sort_keys=False))


# --------------------------------------------------------------------------- export


def _config_json(config: Mapping) -> str:
    # `_name_or_path` is where the model was loaded from on this machine: not for a shared file.
    return json.dumps({k: v for k, v in config.items() if k != "_name_or_path"}, sort_keys=True)


def _metadata(pipe: StableDiffusionPipeline, pipeline_dir: Path) -> dict[str, str]:
    tokenizer = pipe.tokenizer
    meta = {
        "format": "pt",
        "ldm.format": FORMAT_VERSION,
        "ldm.unet": _config_json(json.loads(pipe.unet.to_json_string())),
        "ldm.vae": _config_json(json.loads(pipe.vae.to_json_string())),
        "ldm.text_encoder": _config_json(json.loads(pipe.text_encoder.config.to_json_string(use_diff=False))),
        "ldm.scheduler": _config_json(json.loads(pipe.scheduler.to_json_string())),
        "ldm.tokenizer": json.dumps({"pad_token": tokenizer.pad_token,
                                     "model_max_length": tokenizer.model_max_length,
                                     "vocab_size": len(tokenizer)}),
    }
    meta |= {f"ldm.file.{name}": text for name, text in ldm_files(pipeline_dir).items()}
    return meta


def export_single_file(pipeline_dir: str | os.PathLike, out_path: str | os.PathLike,
                       dtype: torch.dtype | None = None) -> Path:
    """Write the StableDiffusionPipeline directory `pipeline_dir` as one original-layout
    `.safetensors` at `out_path`, with its configs in the metadata; return the path.

    `dtype` (e.g. torch.float16) casts the floating-point weights, for a smaller file.
    The file is written beside `out_path` and renamed into place, so a reader never sees half
    of it. A v-prediction or zero-terminal-SNR model also gets the keys and the companion
    `<name>.yaml` that other UIs read its schedule from (module docstring).
    """
    pipeline_dir, out_path = Path(pipeline_dir), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"out_path {str(out_path)!r} must end in .safetensors")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype} is not a floating-point type")
    pipe = load_pipeline_dir(pipeline_dir, use_safetensors=True)

    tensors = {
        **unet_to_original(pipe.unet.state_dict(), pipe.unet.config),
        **vae_to_original(pipe.vae.state_dict(), pipe.vae.config),
        **text_encoder_to_original(pipe.text_encoder.state_dict(), pipe.text_encoder.config),
    }
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    tensors |= schedule_markers(pipe.scheduler.config)  # after the cast: markers are no weights

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as partial:
        save_file(tensors, partial, metadata=_metadata(pipe, pipeline_dir))
    write_companion_yaml(pipe, out_path)
    return out_path


# --------------------------------------------------------------------------- reading a file


def load_checkpoint(path: str | os.PathLike, allow_pickle: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, safetensors metadata) of a single-file checkpoint.

    A pickled checkpoint (.ckpt/.pt/.pth/.bin) can run code when unpickled, so it is refused
    unless `allow_pickle=True`, and then read with torch.load(weights_only=True), which
    rebuilds only tensors and plain containers and refuses anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        with open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors "
                         f"or a pickled {'/'.join(PICKLE_SUFFIXES)}")
    if not allow_pickle:
        raise ValueError(f"{path} is a pickled checkpoint, which can run code when loaded; "
                         "pass allow_pickle=True to read it with torch.load(weights_only=True), "
                         "or convert it to .safetensors")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: torch.load(weights_only=True) refused it: it holds more than "
                         f"tensors ({str(e).splitlines()[0]})") from e
    while isinstance(state, dict) and "state_dict" in state:  # Lightning checkpoints nest it
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state, {}


# --------------------------------------------------------------------------- original -> diffusers


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"sd1" or "sd2" for an original-layout SD checkpoint, from its text encoder's layout.

    Anything else diffusers recognises (SDXL, inpainting, upscaler, ...) is refused by name.
    """
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        raise ValueError(f"not a Stable Diffusion checkpoint: no {UNET_PREFIX}* keys")
    model_type = infer_diffusers_model_type(state_dict)
    if model_type not in ("v1", "v2"):
        raise ValueError(f"a {model_type!r} checkpoint; only SD-1.x/2.x text-to-image ones import")
    if is_open_clip_model(state_dict):
        return "sd2"
    if is_clip_model(state_dict):
        return "sd1"
    raise ValueError(f"no text encoder: neither {CLIP_PREFIX}* (SD-1.x) nor {OPEN_CLIP_PREFIX}* (SD-2.x) "
                     "keys with embeddings")


def _layer_count(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    layers = {int(k[len(prefix):].split(".")[0]) for k in state_dict if k.startswith(prefix)}
    return max(layers) + 1 if layers else 0  # 0: a text encoder with every layer folded away (clip_skip)


def infer_text_encoder_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """CLIPTextConfig kwargs read off the text encoder's shapes.

    The head count is no shape; both SD text towers use 64-channel heads. SD-2.x conditions
    on the OpenCLIP tower's penultimate block, so its CLIPTextModel has one layer fewer.
    """
    if detect_variant(state_dict) == "sd2":
        p = OPEN_CLIP_PREFIX
        vocab, hidden = state_dict[p + "token_embedding.weight"].shape
        layers = _layer_count(state_dict, p + "transformer.resblocks.") - 1
        config = {"max_position_embeddings": state_dict[p + "positional_embedding"].shape[0],
                  "intermediate_size": state_dict[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  "hidden_act": "gelu"}
    else:
        p = CLIP_PREFIX + "text_model."
        vocab, hidden = state_dict[p + "embeddings.token_embedding.weight"].shape
        layers = _layer_count(state_dict, p + "encoder.layers.")
        config = {"max_position_embeddings": state_dict[p + "embeddings.position_embedding.weight"].shape[0],
                  "intermediate_size": state_dict[p + "encoder.layers.0.mlp.fc1.weight"].shape[0] if layers else 4 * hidden,
                  "hidden_act": "quick_gelu"}
    return {"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": max(hidden // _OPEN_CLIP_HEAD_DIM, 1), **config}


def infer_configs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """Component configs for an original SD-1.x/2.x checkpoint that carries none.

    Shapes give the variant and the text encoder; the rest are the published configs: the
    sd15 or sd2 (2.1, 768-v: v-prediction) UNet, the kl-f8 VAE and SD's noise schedule
    sampled with DDIM. For SD-2 base pass configs={"unet": unet_config("sd2-base"),
    "scheduler": {... "prediction_type": "epsilon"}} to `import_single_file`.
    """
    variant = detect_variant(state_dict)
    text = infer_text_encoder_config(state_dict)
    # the markers others write (module docstring) say what shapes cannot
    prediction = "v_prediction" if variant == "sd2" or V_PRED_KEY in state_dict else "epsilon"
    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if ZTSNR_KEY in state_dict else {}
    return {
        "unet": unet_config("sd2" if variant == "sd2" else "sd15"),
        "vae": vae_config("kl-f8"),
        "text_encoder": text,
        "scheduler": {"_class_name": "DDIMScheduler", **SD_SCHEDULER_CONFIG,
                      "prediction_type": prediction, "set_alpha_to_one": False, **zero_snr},
        "tokenizer": {"pad_token": _PAD_TOKEN[variant], "model_max_length": text["max_position_embeddings"],
                      "vocab_size": text["vocab_size"]},
    }


def _embedded_configs(metadata: Mapping[str, str], path: str | os.PathLike) -> dict[str, dict]:
    """The component configs our export wrote into the metadata, checked: an unknown format
    version or a missing component is an error that names the file and the key."""
    if metadata.get("ldm.format") != FORMAT_VERSION:
        raise ValueError(f"{path}: metadata key 'ldm.format' is {metadata.get('ldm.format')!r}; this version "
                         f"of ldm reads {FORMAT_VERSION!r}")
    missing = [f"ldm.{name}" for name in COMPONENTS if f"ldm.{name}" not in metadata]
    if missing:
        raise ValueError(f"{path}: metadata key {missing[0]!r} is missing (ldm.format {FORMAT_VERSION} writes "
                         f"{', '.join(f'ldm.{n}' for n in COMPONENTS)})")
    return {name: json.loads(metadata[f"ldm.{name}"]) for name in COMPONENTS}


def _load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], component: str) -> None:
    """Load every weight, or fail naming the component and what does not fit its config."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"{component}: the checkpoint does not fit the {component} config "
                         f"(pass configs={{{component!r}: ...}}): {e}") from e
    if missing or unexpected:
        raise ValueError(f"{component}: the checkpoint does not fit the {component} config "
                         f"(pass configs={{{component!r}: ...}}): missing {sorted(missing)[:5]} "
                         f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)})")
    model.eval()


def _build_unet(state_dict, config: dict) -> UNet2DConditionModel:
    unet = UNet2DConditionModel.from_config(config)
    _load_into(unet, convert_ldm_unet_checkpoint(state_dict, dict(unet.config)), "unet")
    return unet


def _build_vae(state_dict, config: dict) -> AutoencoderKL:
    vae = AutoencoderKL.from_config(config)
    _load_into(vae, convert_ldm_vae_checkpoint(state_dict, dict(vae.config)), "vae")
    return vae


def _build_text_encoder(state_dict, config: dict) -> CLIPTextModel:
    model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    if is_open_clip_model(state_dict):
        # Only the blocks the CLIPTextModel has: the tower's last one is SD-2's unused layer.
        layers = model.config.num_hidden_layers
        unused = re.compile(rf"{re.escape(OPEN_CLIP_PREFIX)}transformer\.resblocks\.(\d+)\.")
        state_dict = {k: v for k, v in state_dict.items()
                      if not ((m := unused.match(k)) and int(m[1]) >= layers)}
        converted = convert_open_clip_checkpoint(model, state_dict, prefix=OPEN_CLIP_PREFIX)
    else:
        converted = convert_ldm_clip_checkpoint(state_dict)
    if not hasattr(model, "text_model"):  # transformers >= 5.6: no `text_model.` level
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # SD-1.x files made with older transformers carry CLIP's position_ids, a buffer it rebuilds.
    converted = {k: v for k, v in converted.items() if not k.endswith("embeddings.position_ids")}
    _load_into(model, converted, "text_encoder")
    return model


def _build_scheduler(config: dict) -> SchedulerMixin:
    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"scheduler config: _class_name {name!r} is not a diffusers scheduler")
    return cls.from_config(config)


def _build_tokenizer(config: dict):
    tokenizer = build_tokenizer(config["model_max_length"], config["pad_token"])
    if len(tokenizer) != config["vocab_size"]:
        raise ValueError(f"tokenizer: the file's has {config['vocab_size']} tokens, the CLIP BPE "
                         f"vocabulary {len(tokenizer)}; added tokens (e.g. textual inversion) do not travel")
    return tokenizer


def _ldm_files_in(metadata: Mapping[str, str]) -> dict[str, str]:
    """The pipeline directory's files the metadata carries (ldm.pipeline), by name, checked before
    anything is written."""
    files = {}
    for key, text in metadata.items():
        if key.startswith("ldm.file."):
            name = key.removeprefix("ldm.file.")
            check_ldm_file_name(name)  # never outside out_dir
            files[name] = text
    return files


def carried_files(path: str | os.PathLike) -> dict[str, str]:
    """The pipeline directory's files (ldm.pipeline: its training record) a .safetensors
    checkpoint carries, by name, read from its header; none for a file made elsewhere."""
    with open_safetensors(path) as f:
        return _ldm_files_in(dict(f.metadata() or {}))


def single_file_configs(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(component configs, `ldm*.json` files) of a .safetensors checkpoint, as `import_single_file`
    resolves them, read from its header alone: names, shapes and metadata, no weights. The
    scheduler's config is the one its import saves (with the scheduler class's defaults)."""
    with open_safetensors(path) as f:
        metadata = dict(f.metadata() or {})
        skeleton = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    configs = _embedded_configs(metadata, path) if "ldm.format" in metadata else infer_configs(skeleton)
    scheduler = _build_scheduler(configs["scheduler"])
    configs["scheduler"] = {"_class_name": type(scheduler).__name__, **scheduler.config}
    return configs, _ldm_files_in(metadata)


def import_single_file(path: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                       allow_pickle: bool = False, configs: Mapping[str, dict] | None = None
                       ) -> StableDiffusionPipeline:
    """Build a StableDiffusionPipeline from an original-layout single file (ours or any
    SD-1.x/2.x), and save it as a diffusers directory at `out_dir` if given.

    Configs come from the file's metadata, or `infer_configs` when it has none; each entry of
    `configs` ("unet", "vae", "text_encoder", "scheduler", "tokenizer") replaces that component's
    config whole. Pickled checkpoints need `allow_pickle=True` (see `load_checkpoint`).
    """
    state_dict, metadata = load_checkpoint(path, allow_pickle=allow_pickle)
    unknown = sorted(set(configs or {}) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"configs: unknown component(s) {unknown}; known: {list(COMPONENTS)}")
    carried = _ldm_files_in(metadata)
    found = _embedded_configs(metadata, path) if "ldm.format" in metadata else infer_configs(state_dict)
    resolved = {**found, **(configs or {})}

    pipe = StableDiffusionPipeline(
        vae=_build_vae(state_dict, resolved["vae"]),
        text_encoder=_build_text_encoder(state_dict, resolved["text_encoder"]),
        tokenizer=_build_tokenizer(resolved["tokenizer"]),
        unet=_build_unet(state_dict, resolved["unet"]),
        scheduler=_build_scheduler(resolved["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if out_dir is not None:
        pipe.save_pretrained(out_dir, safe_serialization=True)
        write_ldm_files(out_dir, carried)
    return pipe
