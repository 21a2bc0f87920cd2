"""Stage 1 through the real `train_vae` loop: tiny VAE, 16 px shapes, a few steps, on CPU.

One run (3 optimiser steps of 2 accumulated micro-batches, EMA, the discriminator from the
second step, a pluggable rFID network) is inspected from every side: what it exported, what
its optimisers did step by step, its checkpoints, and a resume by re-running it.
"""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch
import torch.nn as nn
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

import ldm.train.vae as train_vae_module
from ldm.config import ConfigError, load_config
from ldm.data.images import load_images
from ldm.models.presets import vae_config
from ldm.models.vae import measure_latent_scale
from ldm.train.common import load_object_state, make_accelerator
from ldm.train.vae import VAETrainConfig, train_vae

BASE = ["data.source.kind=shapes", "data.source.size=32", "data.source.resolution=16", "data.transform.resolution=16",
        "data.eval_size=8", "model.preset=tiny-f4", "train.batch_size=4", "train.lr=1e-3", "train.warmup_steps=0",
        "train.log_every=1", "loss.disc_channels=8", "loss.disc_layers=2", "scale_images=32"]
RUN = ["train.steps=3", "train.grad_accum=2", "train.ema_decay=0.9", "train.eval_every=2", "train.save_every=2",
       "loss.disc_start=1", "locality_weight=1.0", "locality_crop=12"]


def vae_cfg(out_dir, *overrides) -> VAETrainConfig:
    return load_config(VAETrainConfig, None, [f"out_dir={out_dir}", *BASE, *overrides])


class StepSpy:
    """Builds the optimisers for train_vae and records, at every step(), whose parameters changed."""

    def __init__(self, make_optimizer):
        self.make_optimizer = make_optimizer
        self.optimizers: list[torch.optim.Optimizer] = []
        self.steps: list[tuple[int, set[int]]] = []  # (optimiser that stepped, optimisers whose params changed)

    def __call__(self, params, loop, **kwargs):
        opt = self.make_optimizer(params, loop, **kwargs)
        index = len(self.optimizers)
        self.optimizers.append(opt)
        inner = opt.step

        def step(_opt, *args, **kw):
            before = [[p.detach().clone() for p in self._params(o)] for o in self.optimizers]
            result = inner(*args, **kw)
            changed = {i for i, o in enumerate(self.optimizers)
                       if any(not torch.equal(b, p) for b, p in zip(before[i], self._params(o)))}
            self.steps.append((index, changed))
            return result

        opt.step = types.MethodType(step, opt)  # a bound method, as torch's LR scheduler expects
        return opt

    @staticmethod
    def _params(opt):
        return [p for group in opt.param_groups for p in group["params"]]


def rfid_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    cfg = vae_cfg(out, *RUN)
    with pytest.MonkeyPatch.context() as mp:
        spy = StepSpy(train_vae_module.make_optimizer)
        mp.setattr(train_vae_module, "make_optimizer", spy)
        vae_dir = train_vae(cfg, features=rfid_net())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"out": out, "cfg": cfg, "vae_dir": vae_dir, "spy": spy, "lines": lines}


def adam_steps(path) -> int:
    """The step count AdamW keeps per parameter, from an accelerate optimizer state file."""
    state = torch.load(path, weights_only=True)["state"]
    counts = {int(s["step"]) for s in state.values()}
    assert len(counts) == 1
    return counts.pop()


# ----------------------------------------------------------------------------- what it exports


def test_latent_scale_is_measured_on_training_latents(run):
    config = json.loads((run["vae_dir"] / "config.json").read_text())
    assert config["scaling_factor"] != pytest.approx(0.18215)
    vae = AutoencoderKL.from_pretrained(run["vae_dir"]).eval()
    train = load_images(run["cfg"].data, "train", desc="")
    torch.manual_seed(123)  # other posterior samples than the run drew: agreement within sampling noise
    with torch.no_grad():
        z = vae.encode(train.batch(list(range(len(train))))).latent_dist.sample()
    # the scale is 1/std of z (about its mean), as SD measured its 0.18215
    assert config["scaling_factor"] == pytest.approx(1 / z.std().item(), rel=0.05)
    assert config["shift_factor"] is None
    results = json.loads((run["out"] / "eval.json").read_text())
    assert results["scaling_factor"] == config["scaling_factor"]
    assert results["latent_std"] == pytest.approx(1.0, abs=0.15)  # held-out latents after scaling


def test_eval_metrics_grids_and_checkpoints_are_written(run):
    out = run["out"]
    results = json.loads((out / "eval.json").read_text())
    assert {"psnr", "ssim", "latent_std", "rfid", "rkid"} <= set(results)  # rFID from the network passed in
    assert results["psnr"] > 0 and -1 <= results["ssim"] <= 1
    for grid in ("recon-000002.png", "recon-final.png"):  # eval_every=2, and the final one
        with Image.open(out / grid) as image:
            assert image.width > 8 * 16 and image.height >= 2 * 16  # 8 (real, recon) pairs per row
    assert any("eval/psnr" in line and line["step"] == 2 for line in run["lines"])
    assert all(line["grad_norm"] > 0 for line in run["lines"] if "rec" in line)  # before clipping (max_grad_norm)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert json.loads((out / "checkpoints" / "step-3" / "ldm_state.json").read_text())["step"] == 3


# ----------------------------------------------------------------------------- the two optimisers


def test_each_optimiser_step_changes_only_its_own_model(run):
    """opt_ae (autoencoder + logvar) and opt_d (discriminator), spied on inside train_vae."""
    steps = run["spy"].steps
    assert [index for index, _ in steps].count(0) == 3  # one AE step per optimiser step
    assert [index for index, _ in steps].count(1) == 2  # the discriminator from step 1 (disc_start=1) on
    for index, changed in steps:
        assert changed == {index}, f"a step of optimiser {index} changed the parameters of {changed}"


def test_gradient_accumulation_steps_once_per_accumulated_batch(run):
    ckpt = run["out"] / "checkpoints" / "step-3"
    # 3 optimiser steps of 2 micro-batches each: AdamW counted 3 (AE) and 2 (discriminator) steps
    assert adam_steps(ckpt / "optimizer.bin") == 3
    assert adam_steps(ckpt / "optimizer_1.bin") == 2


def test_learned_logvar_is_updated_by_the_loop(run):
    raw = load_file(run["out"] / "checkpoints" / "step-3" / "model.safetensors")
    assert raw["logvar"].item() != 0.0  # logvar_init
    logged = [line["logvar"] for line in run["lines"] if "logvar" in line]
    assert logged[0] == 0.0 and len(set(logged)) == len(logged)  # moves every step


def test_discriminator_and_adaptive_weight_run_from_disc_start(run):
    train_lines = [line for line in run["lines"] if "rec" in line]
    assert [line["step"] for line in train_lines] == [1, 2, 3]
    assert "d_loss" not in train_lines[0] and "d_weight" not in train_lines[0]
    for line in train_lines[1:]:
        assert line["d_weight"] > 0 and 0 < line["d_loss"] < 2 and "g_loss" in line


def test_export_holds_the_ema_weights(run):
    ckpt = run["out"] / "checkpoints" / "step-3"
    ema = load_object_state(ckpt, 1)  # (0: the LR schedule)
    exported = AutoencoderKL.from_pretrained(run["vae_dir"])
    raw = load_file(ckpt / "model.safetensors")
    names = [name for name, _ in exported.named_parameters()]
    assert len(names) == len(ema["shadow_params"])
    for (name, param), shadow in zip(exported.named_parameters(), ema["shadow_params"]):
        assert torch.equal(param.data, shadow), name
    assert any(not torch.equal(raw[f"vae.{name}"], param.data) for name, param in exported.named_parameters())


def test_rerunning_the_command_resumes_from_the_last_checkpoint(run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(run["out"], out)
    n_lines = len(run["lines"])
    train_vae(vae_cfg(out, *RUN[1:], "train.steps=4"), features=rfid_net())
    new = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][n_lines:]
    assert [line["step"] for line in new if "rec" in line] == [4]  # not 1, 2, 3 again
    assert adam_steps(out / "checkpoints" / "step-4" / "optimizer.bin") == 4


def test_only_the_main_process_evaluates_and_writes(tmp_path, monkeypatch):
    """On every other rank the loop trains, and neither evaluates nor writes grids or eval.json."""

    class OtherRank(Accelerator):
        @property
        def is_main_process(self) -> bool:
            return False

    def other_rank(*args, **kwargs):
        accelerator = make_accelerator(*args, **kwargs)
        accelerator.__class__ = OtherRank
        return accelerator

    evaluated = []
    monkeypatch.setattr(train_vae_module, "make_accelerator", other_rank)
    monkeypatch.setattr(train_vae_module, "evaluate_vae", lambda *args, **kwargs: evaluated.append(1) or {})
    out = tmp_path / "run"
    out.mkdir()  # the main process makes it
    train_vae(vae_cfg(out, "train.steps=2", "train.eval_every=1"))
    assert not evaluated and not list(out.glob("recon-*.png")) and not (out / "eval.json").exists()


# ----------------------------------------------------------------------------- fine-tuning, scale, config


def test_finetunes_a_kl_f8_layout_vae_from_a_diffusers_directory(tmp_path):
    torch.manual_seed(0)
    source = AutoencoderKL(**vae_config("kl-f8", block_out_channels=(8, 16, 16, 16), norm_num_groups=8, sample_size=32))
    source.save_pretrained(tmp_path / "sd-vae")
    cfg = vae_cfg(tmp_path / "ft", f"model.pretrained={tmp_path / 'sd-vae'}", "train.steps=2",
                  "data.source.resolution=32", "data.transform.resolution=32")
    tuned = AutoencoderKL.from_pretrained(train_vae(cfg))
    assert tuned.config.layers_per_block == 2 and list(tuned.config.block_out_channels) == [8, 16, 16, 16]
    assert tuned.config.scaling_factor == source.config.scaling_factor  # the U-Nets of that VAE still fit it
    before = dict(source.named_parameters())
    assert any(not torch.equal(p.data, before[name].data) for name, p in tuned.named_parameters())
    assert {"psnr", "ssim", "latent_std"} <= set(json.loads((tmp_path / "ft" / "eval.json").read_text()))

    # decoder only (as sd-vae-ft-mse was made): latents stay what they were; the scale is measured when asked
    cfg = vae_cfg(tmp_path / "dec", f"model.pretrained={tmp_path / 'sd-vae'}", "train.steps=2",
                  "data.source.resolution=32", "data.transform.resolution=32", "model.train_decoder_only=true",
                  "model.remeasure_scale=true")
    tuned = AutoencoderKL.from_pretrained(train_vae(cfg))
    assert tuned.config.scaling_factor != pytest.approx(source.config.scaling_factor)
    changed = {name.split(".")[0] for name, p in tuned.named_parameters() if not torch.equal(p.data, before[name].data)}
    assert "decoder" in changed and not changed & {"encoder", "quant_conv"}, changed


@pytest.mark.parametrize("use_shift", [False, True])
def test_measure_latent_scale_is_one_over_the_latent_spread(use_shift):
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config("tiny-f4", sample_size=16)).eval()
    images = torch.rand(6, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    scale, shift = measure_latent_scale(vae, [images[:4], images[4:]], use_shift=use_shift)
    torch.manual_seed(1)
    with torch.no_grad():
        z = torch.cat([vae.encode(images[:4]).latent_dist.sample(), vae.encode(images[4:]).latent_dist.sample()]).double()
    assert scale == pytest.approx(1 / z.std(correction=0).item())
    assert shift == (pytest.approx(z.mean().item()) if use_shift else 0.0)


class _Encoder(nn.Module):
    """An encoder of 2x2 patches; `pooled` adds the image's mean code to every cell, as GroupNorm's statistics do."""

    def __init__(self, pooled: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.pooled = nn.Conv2d(3, 4, 2, stride=2), pooled

    def forward(self, x, encode_only=True):
        z = self.conv(x)
        return z + z.mean((2, 3), keepdim=True) if self.pooled else z


def test_locality_loss_is_zero_for_a_local_code_and_not_for_a_pooled_one():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    for pooled in (False, True):
        ae = _Encoder(pooled)
        loss = train_vae_module.locality_loss(ae, x, ae(x), 8, seed=0, step=1)
        assert (loss.item() > 1e-3) if pooled else loss.item() < 1e-10
    with pytest.raises(ConfigError, match="locality_crop=4"):
        train_vae_module.locality_loss(ae, x, ae(x), 4, seed=0, step=1)


class _Invertible(nn.Module):
    """A lossless autoencoder of 2x2 patches (pixel_unshuffle); `pooled` adds the image's mean code to every
    cell and its decoder takes it off again, so it reconstructs every whole image but codes each cell from
    the whole image, as GroupNorm's statistics do."""

    def __init__(self, pooled: bool):
        super().__init__()
        self.pooled = pooled

    def forward(self, x, encode_only=False, decode_only=False):
        if decode_only:
            return nn.functional.pixel_shuffle(x - x.mean((2, 3), keepdim=True) / 2 if self.pooled else x, 2)
        z = nn.functional.pixel_unshuffle(x, 2)
        return z + z.mean((2, 3), keepdim=True) if self.pooled else z


def test_composite_loss_is_zero_for_a_local_autoencoder_and_not_for_a_pooled_one():
    x = torch.rand(4, 3, 20, 20) * 2 - 1
    for pooled in (False, True):
        ae = _Invertible(pooled)
        torch.testing.assert_close(ae(ae(x), decode_only=True), x)  # both reconstruct every whole image
        encoded, decoded = train_vae_module.composite_loss(ae, x, ae(x), seed=0, step=3)
        assert (min(encoded.item(), decoded.item()) > 1e-3) if pooled else max(encoded.item(), decoded.item()) < 1e-10
    with pytest.raises(ConfigError, match="5 or more latent cells"):
        train_vae_module.composite_loss(ae, x[..., :8, :8], ae(x[..., :8, :8]), seed=0, step=3)


def test_composite_term_trains_and_is_logged(tmp_path):
    out = train_vae(vae_cfg(tmp_path, "train.steps=2", "data.source.resolution=32", "data.transform.resolution=32",
                            "composite_weight=1.0"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert (out / "config.json").is_file()
    assert all(line["composite_enc"] > 0 and line["composite_dec"] > 0 for line in lines if "rec" in line)


def test_locality_term_is_logged_when_weighted(run):
    lines = [line for line in run["lines"] if "rec" in line]
    assert lines and all(line["locality"] > 0 for line in lines)  # a GroupNorm VAE's codes are not yet local


def test_config_errors_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights in the hub cache
    with pytest.raises(ConfigError, match="fid_weights"):
        vae_cfg(tmp_path, "fid=true")
    with pytest.raises(ConfigError, match="composite_weight pastes between the images of a batch"):
        vae_cfg(tmp_path, "composite_weight=1", "train.batch_size=1")
    with pytest.raises(ConfigError, match="model.train_decoder_only is for fine-tuning"):
        vae_cfg(tmp_path, "model.train_decoder_only=true")
    with pytest.raises(ConfigError, match="model.norm_num_groups=8 must divide"):
        vae_cfg(tmp_path, "model.block_out_channels=[12, 16]", "model.norm_num_groups=8")
