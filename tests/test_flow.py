"""Flow matching as the stage-3 objective (noise.objective=flow; Esser et al. 2024, SD3): the forward
process and target, the distribution of t, the config's refusals, a tiny training run whose export
samples in our infer path, in the app's generation path and in diffusers' StableDiffusionPipeline
(with the flow samplers that pipeline can run), and the samplers of each objective refused on the other."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)

from ldm.app import Demo, Limits, RequestError, usable_schedulers
from ldm.config import ConfigError, from_dict, load_config
from ldm.diffusion import (NoiseConfig, TrainNoiseConfig, fill_schedule, flow_inputs, flow_times, make_train_scheduler,
                           schedule_of, scheduler_config, shift_times)
from ldm.infer import Pipeline, generate, load_pipeline
from ldm.losses import diffusion_loss
from ldm.models.presets import unet_config, vae_config
from ldm.sampling import (FLOW_SCHEDULERS, DiffusersGuidanceInterval, Inpainting, add_noise, denoise, make_scheduler,
                          noise_level, predicted_x0, samplers_for, seeded_generators)
from ldm.train.encode import EncodeConfig, encode_dataset
from ldm.train.ldm import LDMTrainConfig, train_ldm

FLOW = scheduler_config(NoiseConfig(objective="flow", shift=2.0))
EPSILON = scheduler_config(NoiseConfig())
PROMPTS = ["a red circle", "a blue square"]


def _flow_cfg(**kwargs) -> NoiseConfig:
    cfg = NoiseConfig(objective="flow", **kwargs)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- forward process


def test_forward_process_and_target_are_rectified_flow():
    """x_t = (1 - t) x0 + t eps and target eps - x0, with the U-Net's timestep t * 1000."""
    x0 = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 2.0
    noisy, timesteps, target, weights = flow_inputs(_flow_cfg(), x0, seeded_generators(range(64)))
    t = (timesteps / 1000).view(-1, 1, 1, 1)
    eps = target + x0
    assert weights is None and timesteps.dtype == torch.float32 and ((t > 0) & (t < 1)).all()
    torch.testing.assert_close(noisy, (1 - t) * x0 + t * eps)
    assert abs(eps.mean().item()) < 0.05 and abs(eps.std().item() - 1) < 0.05  # the noise is N(0, I), not x0
    # each sample's draws come from its own generator: the same sample alone gives the same inputs
    alone = flow_inputs(_flow_cfg(), x0[5:6], seeded_generators([5]))
    torch.testing.assert_close(alone[0], noisy[5:6])
    torch.testing.assert_close(alone[1], timesteps[5:6])


def test_logit_normal_t_has_median_one_half_and_the_shift_moves_it():
    n = 20000
    like = torch.zeros(n, 1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    t = flow_times(_flow_cfg(), gen(), like)
    assert abs(t.median().item() - 0.5) < 0.01
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  quartiles of sigmoid(N(0, 1)) (eq. 19)
    assert abs(t.quantile(0.25).item() - sig(-0.6745)) < 0.01 and abs(t.quantile(0.75).item() - sig(0.6745)) < 0.01
    assert abs(flow_times(_flow_cfg(logit_mean=1.0), gen(), like).median().item() - sig(1.0)) < 0.01
    shifted = flow_times(_flow_cfg(shift=3.0), gen(), like)
    assert abs(shifted.median().item() - 0.75) < 0.01  # 3 * 0.5 / (1 + 2 * 0.5)
    torch.testing.assert_close(shifted, shift_times(t, 3.0))
    uniform = flow_times(_flow_cfg(timestep_sampling="uniform"), gen(), like)
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs((uniform < 0.1).float().mean().item() - 0.1) < 0.01


def test_the_shift_is_the_one_diffusers_flow_scheduler_samples_with():
    scheduler = make_train_scheduler(_flow_cfg(shift=3.0))
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    plain = torch.linspace(1, 1000, 1000).flip(0) / 1000
    torch.testing.assert_close(scheduler.sigmas, shift_times(plain, 3.0))


def test_a_unet_trained_on_one_image_with_flow_samples_that_image():
    """Training and sampling agree end to end (timestep scale, direction of t, sign of the velocity):
    trained on one latent image, the loss falls and every flow sampler lands near it from noise."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("tiny"))
    x0, cond = torch.zeros(1, 4, 4, 4), torch.zeros(8, 8, 64)
    x0[:, :, :2], x0[:, 1:3, :, 2:] = 1.5, -1.0
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for step in range(100):
        noisy, t, target, weights = flow_inputs(_flow_cfg(), x0.expand(8, -1, -1, -1),
                                                seeded_generators([step * 8 + i for i in range(8)]))
        loss = diffusion_loss(unet(noisy, t, encoder_hidden_states=cond).sample, target, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10])
    unet.eval()
    noise = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    assert (noise - x0).abs().mean() > 1.0
    for name in FLOW_SCHEDULERS:
        out = denoise(unet, make_scheduler(name, scheduler_config(_flow_cfg())), cond[:4], None, noise, num_steps=10,
                      generator=seeded_generators([0, 1, 2, 3]))
        assert (out - x0).abs().mean() < 0.3, name


def test_predicted_x0_and_add_noise_invert_the_flow_forward_process():
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    for name in FLOW_SCHEDULERS:
        scheduler = make_scheduler(name, FLOW)
        scheduler.set_timesteps(4)
        t = scheduler.timesteps[1]
        sigma = t.float() / 1000
        x_t = (1 - sigma) * x0 + sigma * eps
        # DPM-Solver and UniPC noise with their own sigma, of which the integer timestep is 1000 sigma rounded down
        torch.testing.assert_close(add_noise(scheduler, x0, eps, t.repeat(3)), x_t, atol=1e-2, rtol=0)
        torch.testing.assert_close(predicted_x0(scheduler, x_t, eps - x0, t), x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["flow-euler", "flow-heun", "flow-dpm++2m"])
def test_flow_img2img_and_inpainting_start_from_the_noised_image(name):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("tiny")).eval()
    cond, image = torch.randn(2, 8, 64), torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    scheduler, seen = make_scheduler(name, FLOW), []
    denoise(unet, scheduler, cond, None, noise, num_steps=4, image_latents=image, strength=0.5,
            callback=lambda i, t, x, x0: seen.append(t))
    assert seen == [int(t) for t in scheduler.timesteps[2 * scheduler.order:]]  # the last half of the steps
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., 2:] = 1  # regenerate the right half
    out = denoise(unet, make_scheduler(name, FLOW), cond, None, noise, num_steps=3, image_latents=image,
                  inpaint=Inpainting(mask))
    assert torch.equal(out[..., :2], image[..., :2]) and (out[..., 2:] - image[..., 2:]).abs().mean() > 0.1


# ----------------------------------------------------------------------------- config


def _noise(*overrides: str) -> TrainNoiseConfig:
    """The noise section as stage 3 reads it: filled, then validated."""
    import yaml

    cfg = from_dict(TrainNoiseConfig, {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
    fill_schedule(cfg, None)
    cfg.validate()
    return cfg


def test_objective_defaults_to_diffusion_and_flow_keys_fill_in():
    assert _noise().objective == "diffusion" and _noise().prediction_type == "epsilon" and _noise().shift is None
    flow = _noise("objective=flow")
    assert (flow.objective, flow.shift, flow.num_train_timesteps, flow.prediction_type) == ("flow", 1.0, 1000, None)
    assert scheduler_config(flow) == {"num_train_timesteps": 1000, "shift": 1.0, "prediction_type": "flow_prediction"}


@pytest.mark.parametrize("overrides,key", [
    (["objective=flow", "prediction_type=v_prediction"], "noise.prediction_type=v_prediction"),
    (["objective=flow", "snr_gamma=5"], "noise.snr_gamma=5.0"),
    (["objective=flow", "zero_terminal_snr=true"], "noise.zero_terminal_snr=True"),
    (["objective=flow", "beta_schedule=linear"], "noise.beta_schedule=linear"),
    (["shift=3.0"], "noise.shift=3.0"),
    (["timestep_sampling=uniform"], "noise.timestep_sampling=uniform"),
    (["objective=flow", "shift=0"], "noise.shift must be > 0"),
])
def test_keys_of_the_other_objective_are_errors_naming_them(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("+", r"\+").replace(".", r"\.")):
        _noise(*overrides)


def test_a_fine_tune_takes_the_objective_and_shift_from_a_flow_model():
    theirs = schedule_of({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, "x")
    cfg = TrainNoiseConfig()
    fill_schedule(cfg, theirs)
    assert (cfg.objective, cfg.shift, cfg.prediction_type) == ("flow", 3.0, None)
    cfg = TrainNoiseConfig(objective="flow")  # an SD (epsilon) model fine-tuned into a flow model: nothing of its betas
    fill_schedule(cfg, schedule_of(EPSILON, "sd"))
    assert (cfg.shift, cfg.beta_schedule) == (1.0, None)
    with pytest.raises(ConfigError, match="use_dynamic_shifting, as Flux does"):
        schedule_of({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "flux")
    with pytest.raises(ValueError, match="use_dynamic_shifting, as Flux does"):
        make_scheduler("flow-euler", {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})


# ----------------------------------------------------------------------------- a trained flow model


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 4-step flow run on a tiny VAE's latents of 16 px shapes: its config and its export."""
    root = tmp_path_factory.mktemp("flow")
    torch.manual_seed(0)
    AutoencoderKL(**vae_config("tiny-f4", scaling_factor=0.5)).save_pretrained(root / "vae")
    cache = encode_dataset(load_config(EncodeConfig, None, [
        f"vae={root / 'vae'}", f"out_dir={root / 'cache'}", "data.source.kind=shapes", "data.source.size=16",
        "data.source.resolution=16", "data.transform.resolution=16", "data.eval_size=4", "shard_size=32"]))
    args = [f"out_dir={root / 'run'}", f"cache={cache}", f"vae={root / 'vae'}", "resume=", "text.encoder=tiny",
            "model.block_out_channels=[16, 32]", "model.down_block_types=[CrossAttnDownBlock2D, DownBlock2D]",
            "model.up_block_types=[UpBlock2D, CrossAttnUpBlock2D]", "model.attention_head_dim=8",
            "model.norm_num_groups=8", "model.layers_per_block=1", "train.batch_size=4", "train.steps=4",
            "train.log_every=1", "validation.steps=2", "validation.seeds=[0]", "validation.prompts=[a red circle]",
            "validation.held_out_batches=1"]
    cfg = load_config(LDMTrainConfig, None, [*args, "noise.objective=flow", "noise.shift=2.0"])
    return {"args": args, "cfg": cfg, "pipeline": train_ldm(cfg), "root": root}


def test_flow_config_defaults_to_flow_samplers_and_refuses_diffusion_ones(run):
    cfg = run["cfg"]
    assert (cfg.noise.objective, cfg.sample_scheduler, cfg.validation.scheduler) == ("flow", "flow-dpm++2m", "flow-dpm++2m")
    for key in ("sample_scheduler", "validation.scheduler"):
        with pytest.raises(ConfigError, match=rf"{key}: scheduler 'dpm\+\+2m' samples diffusion models, .*objective=flow"):
            load_config(LDMTrainConfig, None, [*run["args"], "noise.objective=flow", f"{key}=dpm++2m"])
        with pytest.raises(ConfigError, match=rf"{key}: scheduler 'flow-euler' samples flow models, .*objective=diffusion"):
            load_config(LDMTrainConfig, None, [*run["args"], f"{key}=flow-euler"])
    with pytest.raises(ConfigError, match="noise.snr_gamma=5.0: not used with noise.objective=flow"):
        load_config(LDMTrainConfig, None, [*run["args"], "noise.objective=flow", "noise.snr_gamma=5"])
    # a config file's DDPM noise section is replaced whole from the command line (docs/train_ldm.md)
    replaced = load_config(LDMTrainConfig, None, [*run["args"], "noise.snr_gamma=5", "noise={objective: flow}"])
    assert (replaced.noise.objective, replaced.noise.snr_gamma, replaced.sample_scheduler) == ("flow", 0.0, "flow-dpm++2m")


def test_flow_run_trains_and_exports_the_flow_schedule(run):
    pipeline = run["pipeline"]
    losses = [json.loads(line)["loss"] for line in (run["root"] / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    record = json.loads((pipeline / "ldm.json").read_text())
    assert record["objective"] == "flow" and record["noise"]["objective"] == "flow"
    assert record["training_scheduler"] == {"num_train_timesteps": 1000, "shift": 2.0, "prediction_type": "flow_prediction"}
    saved = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler"
    assert (saved["use_flow_sigmas"], saved["prediction_type"], saved["flow_shift"]) == (True, "flow_prediction", 2.0)
    assert (run["root"] / "run" / "samples").is_dir()


def _arrays(results) -> np.ndarray:
    return np.stack([r["array"] for r in results])


def test_the_export_samples_with_every_flow_sampler_in_infer(run):
    pipe = load_pipeline(run["pipeline"], device="cpu", dtype="float32")
    assert pipe.default_scheduler == "flow-dpm++2m"
    for name in FLOW_SCHEDULERS:
        images = _arrays(generate(pipe, PROMPTS, seeds=[0, 1], scheduler=name, steps=4, guidance_scale=3.0, progress=False))
        assert np.isfinite(images).all() and images.std() > 1e-3, name  # not a constant image
        assert np.abs(images[0] - images[1]).max() > 1e-3, name  # the seed and prompt matter


def test_a_sampler_of_the_other_objective_is_refused_by_name_both_ways(run):
    flow = load_pipeline(run["pipeline"], device="cpu", dtype="float32")
    with pytest.raises(ValueError, match=r"'dpm\+\+2m' samples diffusion models, but this model was trained with "
                                         r"noise.objective=flow; use one of: flow-euler, flow-heun"):
        generate(flow, PROMPTS, scheduler="dpm++2m", steps=2)
    diffusion = Pipeline(unet=flow.unet, vae=flow.vae, text_encoder=flow.text_encoder, tokenizer=flow.tokenizer,
                         base_scheduler_config=EPSILON)
    with pytest.raises(ValueError, match=r"'flow-euler' samples flow models, but this model was trained with "
                                         r"noise.objective=diffusion; use one of: ddpm, ddim"):
        generate(diffusion, PROMPTS, scheduler="flow-euler", steps=2)
    assert usable_schedulers(flow.base_scheduler_config) == samplers_for("flow")
    assert not set(usable_schedulers(EPSILON)) & set(FLOW_SCHEDULERS)


def test_the_app_generates_what_infer_generates(run):
    pipe = load_pipeline(run["pipeline"], device="cpu", dtype="float32")
    demo = Demo(pipe, Limits(max_size=64))
    assert "this pipeline's training schedule" not in demo.forward_schedules  # a flow model has no beta schedule
    gallery, _, _ = demo.generate("a red circle", "", "flow-euler", 4, 3.0, 7, 16, 16, 1)
    ours = generate(pipe, ["a red circle"], seeds=[7], scheduler="flow-euler", steps=4, guidance_scale=3.0,
                    width=16, height=16, progress=False)
    assert np.array_equal(np.asarray(gallery[0][0]), np.asarray(ours[0]["image"]))
    with pytest.raises(RequestError, match="unknown scheduler 'dpm\\+\\+2m'; choose one of flow-euler"):
        demo.generate("a red circle", "", "dpm++2m", 4, 3.0, 7, 16, 16, 1)


def test_diffusers_stable_diffusion_pipeline_samples_the_export_as_infer_does(run):
    """The saved flow-dpm++2m (DPM-Solver++ on flow sigmas) runs in StableDiffusionPipeline as it is and
    gives our images; a FlowMatch* scheduler cannot: the pipeline multiplies by init_noise_sigma."""
    pipe = load_pipeline(run["pipeline"], device="cpu", dtype="float32")
    theirs = StableDiffusionPipeline.from_pretrained(run["pipeline"], local_files_only=True, safety_checker=None,
                                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(theirs.scheduler, DPMSolverMultistepScheduler)
    for name in ("flow-dpm++2m", "flow-unipc"):
        theirs.scheduler = make_scheduler(name, pipe.base_scheduler_config)
        images = theirs(PROMPTS, generator=seeded_generators([0, 1]), num_inference_steps=4, guidance_scale=3.0,
                        output_type="np").images
        ours = _arrays(generate(pipe, PROMPTS, seeds=[0, 1], scheduler=name, steps=4, guidance_scale=3.0, progress=False))
        assert np.abs(ours - images).max() <= 1e-5, name
    theirs.scheduler = make_scheduler("flow-euler", pipe.base_scheduler_config)
    with pytest.raises(AttributeError, match="init_noise_sigma"):
        theirs(PROMPTS, num_inference_steps=2, output_type="np")


@pytest.mark.parametrize("guided", [[1, 2], [0, 1, 2], [1]])
def test_diffusers_samples_a_guidance_interval_through_its_step_callback(run, guided):
    """DiffusersGuidanceInterval gives StableDiffusionPipeline the interval it has no argument for: its images are
    ours with guidance_interval, whichever of the 4 steps the interval holds (the first one included)."""
    pipe = load_pipeline(run["pipeline"], device="cpu", dtype="float32")
    theirs = StableDiffusionPipeline.from_pretrained(run["pipeline"], local_files_only=True, safety_checker=None,
                                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    scheduler = make_scheduler(pipe.default_scheduler, pipe.base_scheduler_config)
    scheduler.set_timesteps(4)
    levels = [noise_level(scheduler, t) for t in scheduler.timesteps] + [0.0]  # falling
    lo = (levels[guided[-1]] + levels[guided[-1] + 1]) / 2
    hi = float("inf") if guided[0] == 0 else (levels[guided[0] - 1] + levels[guided[0]]) / 2
    guide = DiffusersGuidanceInterval(theirs, 3.0, (lo, hi))
    images = theirs(PROMPTS, generator=seeded_generators([0, 1]), num_inference_steps=4, output_type="np",
                    **guide.arguments(4)).images
    ours = _arrays(generate(pipe, PROMPTS, seeds=[0, 1], steps=4, guidance_scale=3.0, guidance_interval=(lo, hi),
                            progress=False))
    every_step = _arrays(generate(pipe, PROMPTS, seeds=[0, 1], steps=4, guidance_scale=3.0,
                                  guidance_interval=(0, float("inf")), progress=False))
    assert np.abs(ours - images).max() <= 1e-5
    assert np.abs(ours - every_step).max() > 1e-3


def test_the_single_file_export_of_a_flow_model_samples_the_same(run, tmp_path):
    from ldm.export import export_single_file

    single = export_single_file(run["pipeline"], tmp_path / "flow.safetensors")
    kwargs = dict(seeds=[0, 1], scheduler="flow-euler", steps=3, guidance_scale=3.0, progress=False)
    from_dir = _arrays(generate(load_pipeline(run["pipeline"], device="cpu", dtype="float32"), PROMPTS, **kwargs))
    pipe = load_pipeline(single, device="cpu", dtype="float32")
    assert pipe.default_scheduler == "flow-dpm++2m"
    assert np.abs(_arrays(generate(pipe, PROMPTS, **kwargs)) - from_dir).max() <= 1e-5
    with pytest.raises(ValueError, match="samples diffusion models"):
        generate(pipe, PROMPTS, scheduler="euler", steps=2)
