"""The fast paths (ldm.fast) on tiny models, CPU: each switch keeps the function, the config checks,
the trainer's and the sampler's use, and the sampler's CUDA-graph safety.

The GPU-only effects (speed, CUDA graphs, flash attention) are measured by bench/;
here the compile switch is traced with dynamo's "eager" backend, which checks that the U-Net
goes through in one graph (what CUDA graphs need) without inductor's minutes of CPU codegen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.config import ConfigError, load_config
from ldm.diffusion import NoiseConfig, scheduler_config
from ldm.fast import FastConfig, apply_fast_paths, apply_to_pipeline, effective, set_backend_flags
from ldm.infer import generate, load_pipeline
from ldm.models.presets import unet_config, vae_config
from ldm.models.text import TEXT_PRESETS, build_tokenizer
from ldm.sampling import denoise, initial_noise, make_scheduler, seeded_generators

pytestmark = pytest.mark.filterwarnings("ignore:Dynamo detected a call")

NO_COMPILE = dict(compile=False)


def _unet(training: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**unet_config("tiny")).train(training)


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 77, 64, generator=g))


def _forward(unet, inputs) -> torch.Tensor:
    x, t, emb = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=emb, return_dict=False)[0]


@pytest.fixture
def restore_backend_flags():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]


# --------------------------------------------------------------------------- config


def test_config_rejects_contradictions_and_unknown_modes():
    with pytest.raises(ConfigError, match="fuse_qkv"):
        load_config(FastConfig, None, ["fuse_qkv=true", "sdpa=false"])
    with pytest.raises(ConfigError, match="inductor mode"):
        load_config(FastConfig, None, ["compile_backend=eager", "compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="compile_mode"):
        load_config(FastConfig, None, ["compile_mode=turbo"])
    sampling = FastConfig.sampling()
    assert sampling.fuse_qkv and sampling.compile_mode == "reduce-overhead" and sampling.fullgraph and sampling.dynamic is False
    assert not FastConfig().fuse_qkv  # the trainer's default: fusing is for sampling only


def test_compiling_is_for_cuda_unless_a_trace_only_backend_is_asked_for():
    cfg = FastConfig(compile_vae=True)
    assert effective(cfg, "cuda") == cfg
    cpu = effective(cfg, "cpu")
    assert not cpu.compile and not cpu.compile_vae and cpu.channels_last == cfg.channels_last
    assert effective(FastConfig(compile_backend="eager"), "cpu").compile


def test_backend_flags_set_tf32_and_cudnn_benchmark(restore_backend_flags):
    set_backend_flags(FastConfig(tf32=True, cudnn_benchmark=True))
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    set_backend_flags(FastConfig(tf32=False, cudnn_benchmark=False))
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.benchmark


# --------------------------------------------------------------------------- each switch keeps the function


@pytest.mark.parametrize("fields", [
    dict(channels_last=True),
    dict(channels_last=False, sdpa=False),
    dict(channels_last=True, fuse_qkv=True),
], ids=["channels_last", "classic-attention", "fused-qkv"])
def test_switch_changes_layout_or_kernel_not_the_result(fields):
    reference, unet, inputs = _unet(), _unet(), _inputs()
    same = apply_fast_paths(unet, FastConfig(**fields, **NO_COMPILE), "cpu")
    assert same is unet
    torch.testing.assert_close(_forward(unet, inputs), _forward(reference, inputs), rtol=1e-5, atol=1e-5)
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == fields["channels_last"]
    processors = {type(p) for p in unet.attn_processors.values()}
    expected = (FusedAttnProcessor2_0 if fields.get("fuse_qkv") else
                AttnProcessor2_0 if fields.get("sdpa", True) else AttnProcessor)
    assert processors == {expected}


def test_sdpa_keeps_the_processors_the_user_chose():
    unet = _unet()
    unet.set_attn_processor(AttnProcessor())  # e.g. xformers, set by load_pipeline(attention=...)
    apply_fast_paths(unet, FastConfig(**NO_COMPILE), "cpu")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}


def test_fused_qkv_is_refused_for_a_model_in_training():
    with pytest.raises(ValueError, match="sampling"):
        apply_fast_paths(_unet(training=True), FastConfig(fuse_qkv=True, **NO_COMPILE), "cpu")


def test_trainer_step_with_fast_paths_matches_the_plain_step():
    """channels_last re-lays the parameters under the optimizer and accelerate: the same gradients and
    update (SGD, so that an update is proportional to its gradient; Adam's first step is about sign(g))."""
    accelerator = Accelerator(cpu=True)
    x, t, emb = _inputs()
    grads, updated = [], []
    for cfg in (None, FastConfig()):  # the trainer's default config: on a CPU, compile is off
        unet = _unet(training=True)
        if cfg is not None:
            apply_fast_paths(unet, cfg, accelerator.device)
            assert unet._compiled_call_impl is None
        optimizer = torch.optim.SGD(unet.parameters(), lr=0.1)
        unet, optimizer = accelerator.prepare(unet, optimizer)
        loss = unet(x, t, encoder_hidden_states=emb, return_dict=False)[0].square().mean()
        accelerator.backward(loss)
        grads.append({k: p.grad.clone() for k, p in unet.named_parameters()})
        optimizer.step()
        updated.append({k: v.detach().clone() for k, v in accelerator.unwrap_model(unet).state_dict().items()})
        accelerator.free_memory()
    assert updated[0].keys() == updated[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)
    for key in updated[0]:
        torch.testing.assert_close(updated[1][key], updated[0][key], rtol=1e-5, atol=1e-6, msg=key)


# --------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config("tiny-f4")), text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS["tiny"])),
        tokenizer=build_tokenizer(), unet=UNet2DConditionModel(**unet_config("tiny")),
        scheduler=make_scheduler("pndm", scheduler_config(NoiseConfig())), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    return path


def test_compiled_pipeline_traces_in_one_graph_and_makes_the_same_images(pipeline_dir):
    """The one torch.compile smoke test: the sampling settings (fused QKV, channels_last, fullgraph,
    one graph per shape, VAE decoder compiled) traced by dynamo; CUDA graphs need the one graph."""
    kwargs = dict(seeds=[3, 4], steps=3, guidance_scale=5.0)
    plain = generate(load_pipeline(pipeline_dir), ["a red circle", "a blue square"], **kwargs)
    pipe = load_pipeline(pipeline_dir)
    keys = set(pipe.unet.state_dict())
    apply_to_pipeline(pipe, FastConfig.sampling(compile_backend="eager", compile_mode="default"))
    fast = generate(pipe, ["a red circle", "a blue square"], **kwargs)
    assert pipe.unet._compiled_call_impl is not None and pipe.vae.decoder._compiled_call_impl is not None
    assert {k for k in pipe.unet.state_dict() if "to_qkv" not in k and "to_kv" not in k} == keys  # no _orig_mod. prefix
    difference = np.abs(np.stack([r["array"] for r in fast]) - np.stack([r["array"] for r in plain])).max()
    assert difference <= 1e-5


class ReusedOutput(torch.nn.Module):
    """A U-Net that returns every output in one buffer, overwritten by its next call: what a U-Net
    compiled with CUDA graphs (mode reduce-overhead) does."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.buffer = unet, None

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)[0]
        self.buffer = torch.empty_like(out) if self.buffer is None else self.buffer
        return (self.buffer.copy_(out),)


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0], ids=["unguided", "guided"])
def test_denoise_keeps_no_reference_to_an_output_the_next_step_overwrites(guidance_scale):
    """PNDM keeps its past model outputs; without a copy they would all become the latest one."""
    unet, (_, _, cond) = _unet(), _inputs()
    results = []
    for model in (unet, ReusedOutput(unet)):
        generators = seeded_generators([0, 1])
        noise = initial_noise((2, 4, 8, 8), generators, "cpu", torch.float32)
        scheduler = make_scheduler("pndm", scheduler_config(NoiseConfig()))
        results.append(denoise(model, scheduler, cond, torch.zeros_like(cond), noise, num_steps=6,
                               guidance_scale=guidance_scale, generator=generators))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


def test_adamw_is_fused_on_the_cpu_too_and_steps_as_the_per_tensor_loop():
    from ldm.train.common import LoopConfig, make_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0][0].weight.detach().clone()
    loop = LoopConfig(lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(models[0].parameters(), loop)
    reference = torch.optim.AdamW(models[1].parameters(), lr=1e-2, betas=(loop.adam_beta1, loop.adam_beta2),
                                  weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    x = torch.randn(32, 8)
    for _ in range(5):
        for model, opt in zip(models, (fused, reference)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (models[0][0].weight - start).abs().max() > 1e-3  # the steps moved the weights
