"""Stage 3 (ldm.train.ldm) on tiny models: every training option does what it says, the export is
a pipeline diffusers loads with the schedule it was trained with, fine-tuning starts from a
Stable Diffusion directory, and bucketed caches train one latent size per batch."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

import ldm.train.ldm as stage3
from ldm.cli import train_ldm_main
from ldm.config import ConfigError, load_config
from ldm.data.cache import CacheMismatchError, LatentCache, open_cache
from ldm.export import export_single_file
from ldm.infer import generate, load_pipeline
from ldm.infer import main as infer_main
from ldm.models.conditioning import load_text
from ldm.models.presets import unet_config, vae_config
from ldm.models.text import TEXT_PRESETS, build_tokenizer, encode_prompts
from ldm.models.unet import UNetModelConfig, build_unet
from ldm.single_file import model_dir
from ldm.train.common import lr_lambda, sample_generators
from ldm.train.encode import EncodeConfig, encode_dataset
from ldm.train.ldm import LDMTrainConfig, conditioning, size_batches, train_ldm

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ["data.source.kind=shapes", "data.source.resolution=32"]
ENCODE = ["data.transform.resolution=32", "shard_size=64", "batch_size=16"]
# The "tiny" presets throughout: 32 px images, 8x8x4 latents, a 64-wide CLIP text encoder.
RUN = ["train.batch_size=4", "train.steps=3", "train.log_every=1", "validation.steps=2", "validation.seeds=[0]",
       "validation.prompts=[a red circle]", "validation.held_out_batches=1", "resume="]


def save_vae(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoencoderKL(**vae_config("tiny-f4", scaling_factor=2.0)).save_pretrained(path)
    return path


def encode(vae: Path, out: Path, *overrides: str, source: tuple[str, ...] = tuple(SHAPES)) -> Path:
    return encode_dataset(load_config(EncodeConfig, None, [f"vae={vae}", f"out_dir={out}", *source, *ENCODE, *overrides]))


def ldm_cfg(out_dir: Path, cache: Path, *overrides: str, config: Path | None = None, vae: Path | None = None) -> LDMTrainConfig:
    base = [f"out_dir={out_dir}", f"cache={cache}", *([f"vae={vae}"] if vae else []), *RUN]
    return load_config(LDMTrainConfig, config, [*base, *overrides])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def unet_weights(pipeline: Path) -> dict[str, torch.Tensor]:
    return load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return save_vae(tmp_path_factory.mktemp("vae"), seed=0)


@pytest.fixture(scope="module")
def cache_dir(vae_dir, tmp_path_factory) -> Path:
    return encode(vae_dir, tmp_path_factory.mktemp("cache") / "latents", "data.source.size=32", "data.eval_size=8")


# ----------------------------------------------------------------------------- every option in one run


@pytest.fixture(scope="module")
def full(vae_dir, cache_dir, tmp_path_factory):
    """4 optimiser steps with every option on; the EMA, optimiser, U-Net and clipping calls are captured."""
    out = tmp_path_factory.mktemp("full")
    cfg = ldm_cfg(out, cache_dir, "noise.prediction_type=v_prediction", "noise.beta_schedule=squaredcos_cap_v2",
                  "noise.zero_terminal_snr=true", "noise.timestep_spacing=trailing", "noise.snr_gamma=5.0",
                  "noise.noise_offset=0.1", "train.ema_decay=0.9", "gradient_checkpointing=true", "train.grad_accum=2",
                  "train.max_grad_norm=0.5", "train.lr=1e-3", "train.warmup_steps=2", "train.lr_schedule=cosine",
                  "train.steps=4", "train.eval_every=2", "train.save_every=1", "train.checkpoints_total_limit=2",
                  "caption_dropout=0.2", "sample_scheduler=ddim", "validation.scheduler=euler",
                  "validation.steps=6", "validation.guidance_scale=3", "validation.guidance_interval=[0.5, 5.0]",
                  "model.addition_embed_type=text", "model.addition_embed_type_num_heads=4", vae=vae_dir)
    seen: dict = {"clips": 0, "norms": []}
    clip = Accelerator.clip_grad_norm_

    def spy(make, key):
        def wrapped(*args, **kwargs):
            seen[key] = make(*args, **kwargs)
            return seen[key]
        return wrapped

    def counting_clip(self, *args, **kwargs):
        seen["clips"] += 1
        seen["norms"].append(norm := clip(self, *args, **kwargs))
        return norm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage3, "make_ema", spy(stage3.make_ema, "ema"))
        mp.setattr(stage3, "make_optimizer", spy(stage3.make_optimizer, "optimizer"))
        mp.setattr(stage3, "build_unet", spy(stage3.build_unet, "unet"))
        mp.setattr(Accelerator, "clip_grad_norm_", counting_clip)
        pipeline = train_ldm(cfg)
    return {"cfg": cfg, "out": out, "pipeline": pipeline, **seen}


def test_export_loads_in_diffusers_with_the_training_schedule(full):
    pipe = StableDiffusionPipeline.from_pretrained(full["pipeline"], local_files_only=True)
    sched = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)  # sample_scheduler
    assert sched.prediction_type == "v_prediction" and sched.rescale_betas_zero_snr is True
    assert sched.timestep_spacing == "trailing" and sched.beta_schedule == "squaredcos_cap_v2"
    info = json.loads((full["pipeline"] / "ldm.json").read_text())
    assert info["caption_dropout"] == pytest.approx(0.2)
    assert info["noise"]["snr_gamma"] == 5.0 and info["noise"]["noise_offset"] == pytest.approx(0.1)
    assert info["training_scheduler"]["rescale_betas_zero_snr"] is True and info["latent_size"] == [8, 8]
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.cross_attention_dim == 64
    # the pooled caption (model.addition_embed_type) is in the export, trained, and plain diffusers runs it
    assert pipe.unet.config.addition_embed_type == "text" and pipe.unet.add_embedding.pool.num_heads == 4
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape[1:] == (32, 32, 3) and np.isfinite(image).all()


def test_the_export_recommends_the_validations_sampling_and_generate_takes_it(full):
    info = json.loads((full["pipeline"] / "ldm.json").read_text())
    assert info["sampling"] == {"steps": 6, "guidance_scale": 3.0, "guidance_interval": [0.5, 5.0]}
    pipe = load_pipeline(full["pipeline"], device="cpu")
    prompt = ["a large red circle on the left, on a gray background"]
    default = generate(pipe, prompt, progress=False)[0]
    assert (default["steps"], default["guidance_scale"], default["guidance_interval"]) == (6, 3.0, (0.5, 5.0))
    explicit = generate(pipe, prompt, steps=6, guidance_scale=3, guidance_interval=(0.5, 5.0), progress=False)[0]
    every_step = generate(pipe, prompt, guidance_interval=(0, float("inf")), progress=False)[0]
    np.testing.assert_array_equal(default["array"], explicit["array"])
    assert np.abs(default["array"] - every_step["array"]).max() > 0


def test_pooling_heads_that_do_not_divide_the_text_width_are_refused(cache_dir, vae_dir, tmp_path):
    cfg = ldm_cfg(tmp_path, cache_dir, "model.addition_embed_type=text", "model.addition_embed_type_num_heads=5", vae=vae_dir)
    with pytest.raises(ConfigError, match="addition_embed_type_num_heads=5 must divide the text encoder's width 64"):
        train_ldm(cfg)
    with pytest.raises(ConfigError, match="only 'text'"):
        ldm_cfg(tmp_path, cache_dir, "model.addition_embed_type=text_time", vae=vae_dir)


def test_a_bad_guidance_interval_is_a_config_error(cache_dir, tmp_path):
    with pytest.raises(ConfigError, match="validation.guidance_interval: need 0 <= lo < hi"):
        ldm_cfg(tmp_path, cache_dir, "validation.guidance_interval=[5.0, 0.5]")
    with pytest.raises(ConfigError, match="validation.guidance_interval: need two noise levels"):
        ldm_cfg(tmp_path, cache_dir, "validation.guidance_interval=[1.0]")


def test_the_export_holds_the_ema_weights_not_the_last_ones(full):
    exported = unet_weights(full["pipeline"])
    names = [n for n, _ in full["unet"].named_parameters()]
    ema = dict(zip(names, full["ema"].shadow_params))
    assert all(torch.equal(exported[n], ema[n]) for n in names)
    last = next(load_file(p) for p in (full["out"] / "checkpoints" / "step-4").glob("model*.safetensors"))
    assert any(not torch.equal(exported[n], last[n]) for n in names)  # the raw training weights differ


def test_accumulation_clipping_and_the_lr_schedule_count_optimiser_steps(full):
    cfg = full["cfg"]
    steps = {float(s["step"]) for s in full["optimizer"].state.values()}
    assert steps == {4.0}  # 4 optimiser steps of 2 micro-batches each, not 8
    assert full["clips"] == 4  # clipped once per optimiser step, when the gradients are complete
    norms = [m["grad_norm"] for m in metrics(full["out"]) if "grad_norm" in m]  # each step's, before clipping
    assert norms == pytest.approx([n.item() for n in full["norms"]]) and all(n > 0 for n in norms)
    logged = {m["step"]: m["lr"] for m in metrics(full["out"]) if "lr" in m}
    factor = lr_lambda(cfg.train)
    assert logged == {k: pytest.approx(cfg.train.lr * factor(k - 1)) for k in (1, 2, 3, 4)}
    assert [logged[k] / cfg.train.lr for k in (1, 2, 3, 4)] == pytest.approx([0.5, 1.0, 1.0, 0.5])  # warm-up, cosine
    assert full["unet"].is_gradient_checkpointing


def test_grids_every_eval_every_checkpoints_within_the_limit_and_metrics(full):
    run = full["out"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert Image.open(run / "samples" / "step-000004.png").size == (36, 36)  # one 32 px image, 2 px padding
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-3", "step-4"]
    lines = metrics(run)
    assert [m["step"] for m in lines if "val_loss" in m] == [2, 4]
    assert all(np.isfinite(m["loss"]) and m["skipped"] == 0 for m in lines if "loss" in m)


# ----------------------------------------------------------------------------- caption dropout, loss


def test_caption_dropout_rate_measured_on_batches(cache_dir, vae_dir, tmp_path):
    cache = open_cache(cache_dir)
    for rate in (0.1, 0.0):
        cfg = ldm_cfg(tmp_path, cache_dir, f"caption_dropout={rate}", vae=vae_dir)
        text_encoder, tokenizer = load_text(cfg.text)
        empty = encode_prompts(text_encoder, tokenizer, [""])
        dropped = total = 0
        for call in range(150):
            indices = [(call * 8 + k) % len(cache) for k in range(8)]
            gen = sample_generators(cfg.train.seed, call, 0, 0, len(indices))  # as the training loop draws them
            cond = conditioning(cfg, cache, indices, text_encoder, tokenizer, empty, gen)
            dropped += sum(torch.equal(row, empty[0]) for row in cond)
            total += len(cond)
        assert dropped / total == pytest.approx(rate, abs=0.03)  # 1200 rows: 4 standard deviations at 0.1


def test_a_tiny_model_learns(cache_dir, vae_dir, tmp_path):
    cfg = ldm_cfg(tmp_path, cache_dir, "train.steps=60", "train.batch_size=8", "train.lr=2e-3", "validation.prompts=[]",
                  vae=vae_dir)
    train_ldm(cfg)
    losses = [m["loss"] for m in metrics(tmp_path) if "loss" in m]
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.9 * np.mean(losses[:15])  # ~0.85 -> ~0.68 (fixed seeds)


# ----------------------------------------------------------------------------- fine-tuning


def test_a_vae_re_exported_with_another_shift_is_refused_before_the_run_starts(cache_dir, vae_dir, tmp_path):
    """Same weights (same hash), another latent shift: training would scale latents with the
    cache's and decode samples with the VAE's; refused with both values, before the run dir exists."""
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.register_to_config(shift_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(CacheMismatchError, match=r"shift_factor: cache has 0\.0, run expects 0\.5"):
        train_ldm(ldm_cfg(tmp_path / "run", cache_dir, vae=tmp_path / "vae"))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A Stable Diffusion directory as diffusers saves one: tiny U-Net, VAE and CLIP, a v-prediction DDIM scheduler."""
    path = tmp_path_factory.mktemp("sd")
    torch.manual_seed(1)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config("tiny-f4", scaling_factor=1.5)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS["tiny"])), tokenizer=build_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**unet_config("tiny")),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                prediction_type="v_prediction", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path)
    return path


def test_finetune_takes_text_vae_and_schedule_from_the_sd_directory(sd_dir, cache_dir, tmp_path, capsys):
    cache = encode(sd_dir, tmp_path / "latents", "data.source.size=8", "data.eval_size=0")  # with the pipeline's VAE
    overrides = [f"model.pretrained={sd_dir}", "train.mixed_precision='no'", "train.batch_size=4"]
    cfg = ldm_cfg(tmp_path / "run", cache, *overrides, config=ROOT / "configs/ldm/sd15_finetune.yaml")
    assert (cfg.vae, cfg.text.encoder) == (str(sd_dir), str(sd_dir))
    assert (cfg.noise.prediction_type, cfg.noise.beta_schedule, cfg.noise.timestep_spacing) == ("v_prediction", "scaled_linear", "leading")

    pipeline = train_ldm(cfg)

    printed = capsys.readouterr().out
    assert f"fine-tuning the U-Net of {sd_dir}" in printed and "vae: model.pretrained's" in printed
    assert "prediction_type=v_prediction" in printed
    start, end = unet_weights(sd_dir), unet_weights(pipeline)
    assert start.keys() == end.keys() and any(not torch.equal(start[k], end[k]) for k in start)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token == "!"
    assert json.loads((pipeline / "ldm.json").read_text())["fine_tuned_from"] == str(sd_dir)

    # the config wins where it speaks, and the run says so; a cache from another VAE is refused
    cfg = ldm_cfg(tmp_path / "eps", cache, *overrides, "noise.prediction_type=epsilon")
    assert cfg.noise.prediction_type == "epsilon"
    assert "prediction_type=epsilon (set in the config; v_prediction there)" in "\n".join(stage3.finetune_report(cfg))
    with pytest.raises(CacheMismatchError, match="vae_hash"):
        train_ldm(ldm_cfg(tmp_path / "other", cache_dir, *overrides))


def test_finetune_from_a_single_file_checkpoint(sd_dir, tmp_path, monkeypatch, capsys):
    """An SD .safetensors where the directory was: stage 2 encodes with its VAE, stage 3 fine-tunes its
    U-Net with its text encoder and schedule, and the config keeps the file's path."""
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "imports"))
    file = export_single_file(sd_dir, tmp_path / "sd.safetensors")
    cache = encode(file, tmp_path / "latents", "data.source.size=8", "data.eval_size=0")
    cfg = ldm_cfg(tmp_path / "run", cache, f"model.pretrained={file}", "train.mixed_precision='no'",
                  "train.lr=1e-6", "train.ema_decay=0")
    assert (cfg.vae, cfg.text.encoder, cfg.noise.prediction_type) == (str(file), str(file), "v_prediction")

    pipeline = train_ldm(cfg)

    printed = capsys.readouterr().out
    assert printed.count("importing") == 1 and f"fine-tuning the U-Net of {file}" in printed
    assert f"pretrained: {file}" in (tmp_path / "run" / "config.yaml").read_text()
    start, end = unet_weights(sd_dir), unet_weights(pipeline)  # 3 steps at 1e-6 from the file's weights
    assert max((start[k] - end[k]).abs().max().item() for k in start) < 1e-4
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True).tokenizer.pad_token == "!"


def test_dry_run_reads_a_single_file_header_without_importing_it(sd_dir, cache_dir, tmp_path, monkeypatch, capsys):
    """Loading the config (what --dry-run does) takes the file's schedule and CLIP layer from its
    header: the same values its import gives, and no import."""
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "imports"))
    file = export_single_file(sd_dir, tmp_path / "sd.safetensors")
    train_ldm_main(["--dry-run", f"out_dir={tmp_path / 'run'}", f"cache={cache_dir}", f"model.pretrained={file}"])
    assert "prediction_type: v_prediction" in capsys.readouterr().out
    assert not (tmp_path / "imports").exists() and not (tmp_path / "run").exists()

    from_header = ldm_cfg(tmp_path / "run", cache_dir, f"model.pretrained={file}")
    imported = ldm_cfg(tmp_path / "run", cache_dir, f"model.pretrained={model_dir(file)}")
    assert from_header.noise == imported.noise and from_header.text.clip_skip == imported.text.clip_skip


@pytest.fixture(scope="module")
def sd_cache(sd_dir, tmp_path_factory) -> Path:
    return encode(sd_dir, tmp_path_factory.mktemp("sd_cache") / "latents", "data.source.size=8", "data.eval_size=0")


LORA = ["lora.rank=4", "lora.alpha=8", "train.lr=1e-2", "train.ema_decay=0.5", "train.max_grad_norm=1.0",
        "gradient_checkpointing=true"]  # as configs/ldm/sd15_finetune.yaml: the adapters still get gradients


def test_lora_trains_the_adapters_alone_and_exports_them_merged_and_as_a_diffusers_lora(sd_dir, sd_cache, tmp_path):
    cache = sd_cache
    cfg = ldm_cfg(tmp_path / "run", cache, f"model.pretrained={sd_dir}", *LORA)

    pipeline = train_ldm(cfg)

    # the export is a plain U-Net in which only the adapted layers moved
    start, end = unet_weights(sd_dir), unet_weights(pipeline)
    assert start.keys() == end.keys()
    adapted = {k for k in start if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))}
    assert adapted and {k for k in start if not torch.equal(start[k], end[k])} == adapted
    # the adapters alone load onto the original model at their trained strength (alpha / rank = 2)
    base = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True)
    base.load_lora_weights(tmp_path / "run" / "lora")
    merged = UNet2DConditionModel.from_pretrained(pipeline / "unet")
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 64, generator=gen)
    with torch.no_grad():
        theirs, ours = (u(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample for u in (base.unet, merged))
        plain = UNet2DConditionModel.from_pretrained(sd_dir / "unet")(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample
    assert (ours - plain).abs().max() > 1e-3 and torch.allclose(theirs, ours, atol=1e-5)
    # and so does kohya's layout of them, the web UIs' file (diffusers reads that layout too)
    base.unload_lora_weights()
    base.load_lora_weights(tmp_path / "run" / "lora", weight_name="run.safetensors")
    with torch.no_grad():
        kohya = base.unet(x, torch.tensor([10, 500]), encoder_hidden_states=c).sample
    assert torch.allclose(kohya, ours, atol=1e-5)
    assert json.loads((pipeline / "ldm.json").read_text())["lora"]["alpha"] == 8

    with pytest.raises(ConfigError, match="lora.rank needs model.pretrained"):
        ldm_cfg(tmp_path / "scratch", cache, "lora.rank=4")
    with pytest.raises(ValueError, match=r"lora.targets: \['conv_in'\] name no linear layer"):
        train_ldm(ldm_cfg(tmp_path / "conv", cache, f"model.pretrained={sd_dir}", "lora.rank=4", "lora.targets=[conv_in]"))


def test_infer_folds_a_trained_lora_into_the_original_model(sd_dir, sd_cache, tmp_path):
    run = tmp_path / "style"
    pipeline = train_ldm(ldm_cfg(run, sd_cache, f"model.pretrained={sd_dir}", *LORA, "validation.prompts=[]"))
    kohya = run / "lora" / "style.safetensors"
    merged = load_pipeline(pipeline, device="cpu", dtype="float32")
    for lora in (run / "lora", kohya):  # our directory, or the web UIs' file on its own
        folded = load_pipeline(sd_dir, device="cpu", dtype="float32", loras=[(lora, 1.0)])
        ours, theirs = folded.unet.state_dict(), merged.unet.state_dict()
        assert ours.keys() == theirs.keys()  # a plain U-Net again: no adapter layers left
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    half = load_pipeline(sd_dir, device="cpu", dtype="float32", loras=[(kohya, 0.5)]).unet.state_dict()
    plain = load_pipeline(sd_dir, device="cpu", dtype="float32").unet.state_dict()
    key = next(k for k in plain if k.endswith("attn1.to_q.weight"))
    assert torch.allclose(half[key] - plain[key], 0.5 * (theirs[key] - plain[key]), atol=1e-6)

    # the command line: --lora PATH:STRENGTH gives the merged export's images
    args = ["--prompt", "a red circle", "--steps", "2", "--device", "cpu", "--guidance-scale", "2", "--scheduler", "euler"]
    infer_main([str(sd_dir), "--lora", f"{kohya}:1", *args, "--out", str(tmp_path / "folded")])
    infer_main([str(pipeline), *args, "--out", str(tmp_path / "merged")])
    a, b = (np.asarray(Image.open(tmp_path / d / "0000-seed0.png"), dtype=int) for d in ("folded", "merged"))
    assert np.abs(a - b).max() <= 1
    with pytest.raises(SystemExit, match="no LoRA file or directory"):
        infer_main([str(sd_dir), "--lora", str(tmp_path / "missing.safetensors"), *args])


def test_lora_resumed_from_a_checkpoint_ends_as_the_run_that_never_stopped(sd_dir, sd_cache, tmp_path):
    args = [f"model.pretrained={sd_dir}", *LORA, "train.steps=4", "validation.prompts=[]"]
    whole = train_ldm(ldm_cfg(tmp_path / "whole", sd_cache, *args))
    train_ldm(ldm_cfg(tmp_path / "cut", sd_cache, *args, "train.steps=2"))
    resumed = train_ldm(ldm_cfg(tmp_path / "cut", sd_cache, *args, "resume=latest"))
    ours, theirs = unet_weights(resumed), unet_weights(whole)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    ours, theirs = (load_file(run / "lora" / "pytorch_lora_weights.safetensors") for run in (tmp_path / "cut", tmp_path / "whole"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_training_steps_run_in_train_mode_before_and_after_validation(sd_dir, sd_cache, tmp_path, monkeypatch):
    """from_pretrained gives an eval-mode U-Net; its LoRA dropout must still be on at every training
    step, the ones after a validation too, and off while validating."""
    modes = []  # (grad enabled, every module in train mode, none in train mode) per U-Net call

    def record(module, args):
        flags = [m.training for m in module.modules()]
        modes.append((torch.is_grad_enabled(), all(flags), not any(flags)))

    def build_recorded(*args, **kwargs):
        unet = build_unet(*args, **kwargs)
        unet.register_forward_pre_hook(record)
        return unet

    monkeypatch.setattr(stage3, "build_unet", build_recorded)
    train_ldm(ldm_cfg(tmp_path / "run", sd_cache, f"model.pretrained={sd_dir}", "lora.rank=4", "lora.dropout=0.5",
                      "train.eval_every=1", "train.ema_decay=0"))
    training = [all_train for grad, all_train, _ in modes if grad]
    validating = [all_eval for grad, _, all_eval in modes if not grad]
    assert len(training) == 3 and all(training), modes
    assert validating and all(validating), modes


def test_only_cross_attention_at_one_level_mirrors_into_the_up_blocks():
    """model.only_cross_attention names the down blocks whose attention reads only the text; the up
    block at the same resolution gets the same, and the other levels keep their self-attention."""
    cross = ["CrossAttnDownBlock2D"] * 2
    model = UNetModelConfig(block_out_channels=[16, 32], down_block_types=cross, up_block_types=["CrossAttnUpBlock2D"] * 2,
                            only_cross_attention=[True, False], norm_num_groups=8)
    unet = build_unet(model, 4, 8, 32)
    kind = lambda block: [t.only_cross_attention for a in block.attentions for t in a.transformer_blocks]  # noqa: E731
    assert set(kind(unet.down_blocks[0])) == {True} and set(kind(unet.up_blocks[1])) == {True}
    assert set(kind(unet.down_blocks[1])) == {False} and set(kind(unet.up_blocks[0])) == {False}
    # cross-attention only: the first attention's keys come from the text width, not the image's
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.in_features == 32
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 7, 32)).sample
    assert out.shape == (2, 4, 8, 8)


def test_finetune_refuses_architecture_keys_and_unfit_parts(sd_dir, cache_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.block_out_channels"):
        ldm_cfg(tmp_path, cache_dir, f"model.pretrained={sd_dir}", "model.block_out_channels=[16, 32]")
    model = UNetModelConfig(pretrained=str(sd_dir))
    with pytest.raises(ValueError, match="cross_attention_dim is 64, the text encoder gives 256"):
        build_unet(model, 4, 8, 256)
    with pytest.raises(ValueError, match="takes 4-channel latents, the cache holds 8-channel"):
        build_unet(model, 8, 8, 64)


# ----------------------------------------------------------------------------- buckets, resume, config


def write_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"a picture number {i % 3}")
    return root


def test_a_bucketed_cache_trains_one_latent_size_per_batch(vae_dir, tmp_path):
    images = write_folder(tmp_path / "images", [(32, 32)] * 10 + [(48, 24)] * 8)
    cache = encode(vae_dir, tmp_path / "latents", "data.eval_size=0", "data.transform.buckets=true",
                   "data.transform.bucket_step=8", source=("data.source.kind=imagefolder", f"data.source.path={images}"))
    assert sorted(open_cache(cache).size_groups()) == ["6x10", "8x8"]
    shapes = []
    latents = LatentCache.latents

    def recording(self, indices, *args, **kwargs):
        z = latents(self, indices, *args, **kwargs)
        shapes.append(tuple(z.shape))
        return z

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LatentCache, "latents", recording)
        pipeline = train_ldm(ldm_cfg(tmp_path / "run", cache, "train.steps=6", vae=vae_dir))
    assert set(shapes) == {(4, 4, 8, 8), (4, 4, 6, 10)}
    assert UNet2DConditionModel.from_pretrained(pipeline / "unet").config.sample_size == 8  # the most common size


def test_size_batches_one_size_each_fixed_by_seed_and_resumable():
    groups = {"8x8": list(range(0, 10)), "6x10": list(range(10, 17))}
    stream = list(islice(size_batches(groups, 2, seed=3, world=2), 12))
    size_of = {i: k for k, items in groups.items() for i in items}
    assert all(len({size_of[i] for i in b}) == 1 and len(b) == 2 for b in stream)
    assert stream[:3] == list(islice(size_batches(groups, 2, seed=3, world=2), 3))  # a pure function of the seed
    assert stream[5:12] == list(islice(size_batches(groups, 2, seed=3, start_batch=5, world=2), 7))  # resume mid-epoch
    other_rank = list(islice(size_batches(groups, 2, seed=3, rank=1, world=2), 12))
    assert all(size_of[a[0]] == size_of[b[0]] and not set(a) & set(b) for a, b in zip(stream, other_rank))
    assert len({tuple(sorted(b)) for b in stream[:4]}) == 4  # an epoch (4 global batches) never repeats an item
    with pytest.raises(ValueError, match="no latent size has a full global batch of 16"):
        next(size_batches(groups, 8, seed=0, world=2))


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one precision per process: start and leave this test with a clean state."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_resume_flag_continues_from_the_latest_checkpoint_in_bf16(cache_dir, vae_dir, tmp_path, capsys, fresh_accelerate):
    args = [f"out_dir={tmp_path}", f"cache={cache_dir}", f"vae={vae_dir}", *RUN[:-1], "validation.prompts=[]",
            "train.mixed_precision=bf16"]  # autocast on the CPU too
    train_ldm_main([*args, "train.steps=2", "--resume", ""])
    train_ldm_main([*args, "train.steps=3", "--resume", "latest"])
    assert f"resumed from {tmp_path / 'checkpoints' / 'step-2'} at step 2" in capsys.readouterr().out
    lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in lines)


def test_metrics_go_to_tensorboard_where_installed(cache_dir, vae_dir, tmp_path):
    pytest.importorskip("tensorboard")
    train_ldm(ldm_cfg(tmp_path, cache_dir, "train.steps=2", "train.report_to=tensorboard", "validation.prompts=[]", vae=vae_dir))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_eight_bit_adam_needs_bitsandbytes(cache_dir, vae_dir, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="use_8bit_adam needs bitsandbytes"):
            ldm_cfg(tmp_path, cache_dir, "use_8bit_adam=true", vae=vae_dir)
    else:
        assert ldm_cfg(tmp_path, cache_dir, "use_8bit_adam=true", vae=vae_dir).use_8bit_adam


def test_validation_scheduler_must_sample_the_schedule(cache_dir, vae_dir, tmp_path):
    zero_snr = ["noise.prediction_type=v_prediction", "noise.zero_terminal_snr=true", "noise.timestep_spacing=trailing"]
    with pytest.raises(ConfigError, match="validation.scheduler: scheduler 'pndm' cannot sample"):
        ldm_cfg(tmp_path, cache_dir, *zero_snr, "validation.scheduler=pndm", vae=vae_dir)
