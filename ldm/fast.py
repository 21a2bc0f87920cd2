"""GPU fast paths for the U-Net (and the VAE decoder), each a switch in `FastConfig`.

    apply_fast_paths(unet, cfg, device)      # the trainer, before the optimizer and accelerator.prepare
    apply_to_pipeline(pipe, cfg)             # the sampler, on an ldm.infer.Pipeline

Both change the module in place and keep its class, parameters and state-dict keys, so EMA,
checkpoints, `save_pretrained` and `accelerator.unwrap_model` see the model they always saw
(torch.compile is `nn.Module.compile`, not the `torch.compile(module)` wrapper with its
`_orig_mod.` keys). What each switch buys on an H100 is measured by bench/bench_train.py and
bench/bench_sample.py (`--ablation`); bench/README.md has the figures.

The other fast paths live where their work is: bf16 (`train.mixed_precision=bf16`; inference
loads in bf16 on CUDA), fused AdamW (`ldm.train.common.make_optimizer`, CUDA and CPU), the latent and
text-embedding caches (`ldm.data.cache`), one batched forward for classifier-free guidance
(`ldm.sampling.denoise`).

On a device other than CUDA the compile switches are off (`effective`): inductor's CPU build of
an SD-size U-Net takes minutes, and CUDA graphs need CUDA. channels_last and the attention
choices apply everywhere, since they change the layout and the kernel, not the result.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ldm.config import require

# torch.compile's modes: "reduce-overhead" and "max-autotune" replay the compiled U-Net as CUDA
# graphs (one launch per forward instead of ~1000; static shapes, outputs overwritten by the next call).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclasses.dataclass
class FastConfig:
    channels_last: bool = True        # NHWC weights (and so activations): cuDNN's tensor-core convolutions want it
    sdpa: bool = True                 # torch's scaled_dot_product_attention (flash kernel in bf16 on CUDA; diffusers'
                                      # default); false: diffusers' classic AttnProcessor (baddbmm + softmax), a reference
    fuse_qkv: bool = False            # one q|k|v matmul per self-attention, one k|v per cross-attention; sampling only
    compile: bool = True              # torch.compile the U-Net in place (CUDA only; the first forward of a shape compiles)
    compile_mode: CompileMode = "default"  # "reduce-overhead": CUDA graphs, for sampling (static shapes)
    compile_backend: str = "inductor"  # "eager" / "aot_eager": trace only (finds graph breaks in seconds, no speed-up)
    fullgraph: bool = False           # a graph break is an error instead of a split (CUDA graphs want one piece)
    dynamic: bool | None = None       # None: torch's default (a shape change recompiles once, shape-generic);
                                      # false: one graph per shape (fastest kernels, a compile per new batch size)
    compile_vae: bool = False         # also compile the VAE decoder (sampling: the decode after the last step)
    tf32: bool = True                 # TF32 tensor cores for the float32 matmuls and convolutions that remain
    cudnn_benchmark: bool = True      # cuDNN times its convolution algorithms once per shape and keeps the fastest

    def validate(self) -> None:
        require(not (self.fuse_qkv and not self.sdpa),
                "fast.fuse_qkv runs diffusers' FusedAttnProcessor2_0, which is SDPA: it cannot go with fast.sdpa=false")
        require(self.compile_backend == "inductor" or self.compile_mode == "default",
                f"fast.compile_mode={self.compile_mode!r} is an inductor mode; fast.compile_backend is {self.compile_backend!r}")

    @classmethod
    def sampling(cls, **overrides) -> "FastConfig":
        """The settings for generating: fused QKV, CUDA graphs over a one-piece graph, one graph per
        batch shape, the VAE decoder compiled too."""
        settings = dict(fuse_qkv=True, compile_mode="reduce-overhead", fullgraph=True, dynamic=False, compile_vae=True)
        return cls(**{**settings, **overrides})


def effective(cfg: FastConfig, device: torch.device | str) -> FastConfig:
    """The switches that take effect on `device`: off CUDA, no compiling (see the module docstring),
    unless a trace-only backend was asked for (tests and graph-break hunting)."""
    device = torch.device(device)
    if device.type == "cuda" or cfg.compile_backend != "inductor":
        return cfg
    return dataclasses.replace(cfg, compile=False, compile_vae=False)


def set_backend_flags(cfg: FastConfig) -> None:
    """Process-wide CUDA math settings (they touch every model in the process, as torch's flags do).

    torch.set_float32_matmul_precision rather than the allow_tf32 flags: torch >= 2.9 raises on a
    later precision query once the legacy and the new TF32 settings are mixed.
    """
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.tf32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def set_attention(model: torch.nn.Module, cfg: FastConfig) -> None:
    """With sdpa, the model's processors stay (diffusers' default is AttnProcessor2_0, i.e. SDPA; or
    xformers where the user chose it); without, the classic AttnProcessor. Then optionally fused projections."""
    from diffusers.models.attention_processor import AttnProcessor

    if not cfg.sdpa:
        model.set_attn_processor(AttnProcessor())
    if cfg.fuse_qkv:
        fuse_qkv(model)


def fuse_qkv(model: torch.nn.Module) -> None:
    """diffusers' fused projections, for a model that is not being trained.

    important: fusing copies to_q/to_k/to_v into new to_qkv/to_kv layers. Trained that way, the
    optimizer would update the copies while save_pretrained (and EMA over the old parameters, and
    DDP's unused-parameter check) still see the originals; so a model in training mode is refused.
    """
    if model.training:
        raise ValueError("fast.fuse_qkv is for sampling: a model in training mode would train fused copies "
                         "of to_q/to_k/to_v while checkpoints and exports keep the originals; set fast.fuse_qkv=false")
    model.fuse_qkv_projections()


def compile_module(module: torch.nn.Module, cfg: FastConfig) -> None:
    """`module.compile(...)` in place with the config's mode, backend, fullgraph and dynamic settings."""
    options = dict(backend=cfg.compile_backend, fullgraph=cfg.fullgraph, dynamic=cfg.dynamic)
    if cfg.compile_backend == "inductor" and cfg.compile_mode != "default":
        options["mode"] = cfg.compile_mode
    module.compile(**options)


def apply_fast_paths(unet: torch.nn.Module, cfg: FastConfig, device: torch.device | str) -> torch.nn.Module:
    """The U-Net with the switches of `cfg` that take effect on `device`; the same object, changed in place.

    Call it before building the optimizer (channels_last re-lays the parameters) and before
    accelerator.prepare; the trainer leaves fuse_qkv off (see `fuse_qkv`).
    """
    cfg.validate()  # a config built in code skips load_config's checks
    cfg = effective(cfg, device)
    set_backend_flags(cfg)
    set_attention(unet, cfg)
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        compile_module(unet, cfg)
    return unet


def apply_to_pipeline(pipe, cfg: FastConfig):
    """An ldm.infer.Pipeline made fast for sampling: the U-Net as `apply_fast_paths`; the VAE
    channels_last and, with compile_vae, its decoder compiled in the default mode (no CUDA graphs:
    it runs once per batch, so launches do not dominate it, and a graph pool would hold its memory)."""
    cfg = effective(cfg, pipe.device)
    apply_fast_paths(pipe.unet, cfg, pipe.device)
    if cfg.channels_last:
        pipe.vae.to(memory_format=torch.channels_last)
    if cfg.compile_vae:
        compile_module(pipe.vae.decoder, dataclasses.replace(cfg, compile_mode="default", fullgraph=False))
    return pipe
