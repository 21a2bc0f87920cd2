"""Latent consistency distillation (ldm.train.distill) on tiny models: the solver and the consistency
function are the ones diffusers samples with, the guidance embedding is the same at training and
sampling time, the student starts as the teacher, full and LoRA runs export pipelines that plain
diffusers, infer.py and app.py sample with LCMScheduler, a resumed run ends as the one that never
stopped, and bad teachers, caches and samplers are refused with messages that name the problem."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors.torch import load_file

import ldm.train.distill as distill_module
from ldm.cli import distill_main
from ldm.config import ConfigError, load_config
from ldm.data.cache import CacheMismatchError
from ldm.diffusion import NoiseConfig, scheduler_config
from ldm.infer import generate, load_pipeline
from ldm.infer import main as infer_main
from ldm.sampling import denoise, guidance_embedding, make_scheduler, noise_level, set_steps
from ldm.train.distill import (ConsistencyConfig, DDIMSolver, DistillConfig, FlowSolver, GuidanceConfig, distill,
                               guided_scales, lcm_scheduler, make_solver, student_unet, teacher_schedule_problem,
                               teacher_step)
from ldm.train.ldm import train_ldm

from fixtures_runs import latents, ldm_cfg  # noqa: F401  (fixture)

# a few optimiser steps on 4x4x4 latents of 16 px images; the solver's grid of 10 steps (k = 100)
RUN = ["train.batch_size=4", "train.steps=3", "train.lr=1e-3", "train.log_every=1", "train.save_every=2",
       "consistency.solver_steps=10", "guidance.w_min=2", "guidance.w_max=5", "guidance.embedding_dim=16",
       "validation.prompts=[a red circle]", "validation.seeds=[0]", "validation.steps=[1, 2]", "resume="]
LORA = ["lora.rank=4", "lora.alpha=8", "guidance.embedding_dim=0", "guidance.w_min=3", "guidance.w_max=3"]
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", steps_offset=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Resumed and uninterrupted runs are compared bit for bit: one thread sums in one order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(latents, tmp_path_factory) -> Path:
    """A stage-3 run of 2 steps on the cache (epsilon prediction): its pipeline is the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    train_ldm(ldm_cfg(out, latents, "train.steps=2", "train.save_every=0", "resume="))
    return out


def distill_cfg(out: Path, teacher: Path, latents: dict, *overrides: str) -> DistillConfig:
    return load_config(DistillConfig, None, [f"out_dir={out}", f"teacher={teacher}", f"cache={latents['cache']}",
                                             *RUN, *overrides])


@pytest.fixture(scope="module")
def full(teacher, latents, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    distill(distill_cfg(out, teacher, latents, "train.ema_decay=0.9", "train.eval_every=2", "consistency.on_policy=0.5"))
    return out


def unet_weights(pipeline: Path) -> dict[str, torch.Tensor]:
    return load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")


# ----------------------------------------------------------------------------- solver, boundary, embedding


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_the_solver_with_the_exact_prediction_maps_x_t_to_x_t_minus_k_of_the_same_trajectory(kind):
    scheduler = lcm_scheduler({**SCHEDULE, "prediction_type": kind}, ConsistencyConfig())
    solver = DDIMSolver(scheduler)
    assert solver.k == 20 and solver.grid[0] == 19 and solver.grid[-1] == 999
    assert torch.equal(solver.grid, torch.from_numpy(np.arange(1, 51) * 20 - 1))  # LCMScheduler's lcm_origin_timesteps
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64), torch.randn(6, 4, 8, 8, generator=gen, dtype=torch.float64)
    t = solver.grid[torch.tensor([0, 1, 7, 20, 48, 49])]
    x_t = scheduler.add_noise(x0, eps, t)
    exact = {"epsilon": eps, "v_prediction": scheduler.get_velocity(x0, eps, t), "sample": x0}[kind]
    x_s = solver.step(*solver.x0_and_eps(exact, x_t, t), t - solver.k)
    s = t - solver.k
    on_trajectory = torch.where((s >= 0).view(-1, 1, 1, 1), scheduler.add_noise(x0, eps, s.clamp(min=0)), x0)
    assert torch.allclose(x_s, on_trajectory, atol=1e-9)  # and t = k - 1 lands on clean data


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_solver_step_is_diffusers_ddim_step_on_the_same_grid(kind):
    cfg = ConsistencyConfig(solver_steps=10)
    solver = DDIMSolver(lcm_scheduler({**SCHEDULE, "prediction_type": kind}, cfg))
    ddim = DDIMScheduler.from_config({**SCHEDULE, "prediction_type": kind, "timestep_spacing": "trailing",
                                      "steps_offset": 0, "set_alpha_to_one": True, "clip_sample": False})
    ddim.set_timesteps(10)
    assert torch.equal(ddim.timesteps.flip(0), solver.grid)
    gen = torch.Generator().manual_seed(1)
    for t in ddim.timesteps:
        x, pred = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        theirs = ddim.step(pred, t, x, eta=0.0).prev_sample
        tt = torch.full((2,), int(t))
        ours = solver.step(*solver.x0_and_eps(pred, x, tt), tt - solver.k)
        assert torch.allclose(ours, theirs, atol=1e-5), int(t)


class GaussianTeacher:
    """The ideal teacher of data x0 ~ N(0, c^2): its prediction is linear in x_t (E[eps | x_t] in the model's
    parametrisation, a flow's E[eps - x0 | x_t]), whatever the text, and its ODE maps x_t to x_t * std_s / std_t."""

    def __init__(self, solver, kind: str, c: float = 0.5):
        self.solver, self.kind, self.c = solver, kind, c

    def std(self, time, like):
        if self.kind == "flow":
            sigma = self.solver.sigma(time, like)
            return ((1 - sigma) ** 2 * self.c**2 + sigma**2).sqrt()
        abar = self.solver.alpha_bar(time, like)
        return (abar * self.c**2 + 1 - abar).sqrt()

    def __call__(self, x, time, cond):
        var = self.std(time, x) ** 2
        if self.kind == "flow":
            sigma = self.solver.sigma(time, x)
            return SimpleNamespace(sample=x * (sigma - (1 - sigma) * self.c**2) / var)
        abar = self.solver.alpha_bar(time, x)
        eps, x0 = (1 - abar).sqrt() * x / var, abar.sqrt() * self.c**2 * x / var
        return SimpleNamespace(sample=eps if self.kind == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0)


def gaussian_solve(kind: str, substeps: int = 1, heun: bool = False, multistep: bool = False):
    """(the teacher's solve of every skip of a 10-step grid, the exact x_s) on Gaussian data, through teacher_step."""
    cfg = ConsistencyConfig(solver_steps=10, solver_substeps=substeps)
    solver = make_solver(FLOW if kind == "flow" else {**SCHEDULE, "prediction_type": kind}, cfg)
    teacher = GaussianTeacher(solver, kind)
    x = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t, s = solver.grid, solver.previous
    x = x * teacher.std(t, x)
    cond = torch.zeros(10, 1, 1)
    x_s = teacher_step(lambda: contextlib.nullcontext(teacher), solver, x, solver.path.T, cond, cond,
                       lambda time: torch.full((10,), 4.0), contextlib.nullcontext, heun=heun, multistep=multistep)
    return x_s, x * teacher.std(s, x) / teacher.std(t, x)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_heuns_correction_and_substeps_land_nearer_the_exact_ode_solution(kind):
    """At every skip of a 10-step grid the Heun step (consistency.solver_order 2) is nearer the exact solution than
    the DDIM / Euler step (over all of them, at least twice as near), and into clean data it is the Euler step;
    two substeps a skip (consistency.solver_substeps 2) are nearer than one at every skip, that one included."""
    def error(solve):
        x_s, exact = solve
        return (x_s - exact).abs().amax(dim=(1, 2, 3))

    euler, heun, halves = (error(gaussian_solve(kind)), error(gaussian_solve(kind, heun=True)),
                           error(gaussian_solve(kind, substeps=2)))
    assert (heun[1:] < euler[1:]).all() and heun[1:].sum() < euler[1:].sum() / 2, (heun, euler)
    assert heun[0] == euler[0]  # into clean data: Euler's step
    assert (halves < euler).all(), (halves, euler)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_the_multistep_solve_lands_nearer_at_no_extra_pass(kind):
    """Three substeps a skip with DPM-Solver++(2M)'s update after the first (consistency.multistep) land nearer the
    exact solution than three DDIM / Euler substeps at every skip but the one into clean data, where the last
    substep is first order and the two solves differ only by the substep before it."""
    def error(solve):
        x_s, exact = solve
        return (x_s - exact).abs().amax(dim=(1, 2, 3))

    ddim, multi = error(gaussian_solve(kind, substeps=3)), error(gaussian_solve(kind, substeps=3, multistep=True))
    assert (multi[1:] < ddim[1:]).all() and multi[1:].sum() < ddim[1:].sum() / 2, (multi, ddim)
    assert torch.isfinite(multi).all()


def test_substeps_split_each_skip_evenly_between_the_grid_points():
    ddim = make_solver(SCHEDULE, ConsistencyConfig(solver_steps=4, solver_substeps=3))
    assert ddim.path.tolist() == [[249, 166, 82, -1], [499, 416, 332, 249], [749, 666, 582, 499], [999, 916, 832, 749]]
    flow = make_solver(FLOW, ConsistencyConfig(solver_steps=5, solver_substeps=2))
    one = make_solver(FLOW, ConsistencyConfig(solver_steps=10))
    assert torch.equal(flow.path[:, 0], flow.grid) and torch.equal(flow.path[:, -1], flow.previous)
    assert torch.allclose(flow.path[:, 1], one.grid[0::2]) and torch.allclose(flow.grid, one.grid[1::2])


@pytest.mark.parametrize("scaling", [10.0, 1.0])
def test_the_trained_consistency_function_is_what_lcm_scheduler_samples_with(scaling):
    cfg = ConsistencyConfig(timestep_scaling=scaling)
    scheduler = lcm_scheduler(SCHEDULE, cfg)
    sampler = make_scheduler("lcm", {**SCHEDULE, "original_inference_steps": 50, "timestep_scaling": scaling})
    sampler.set_timesteps(4)
    gen = torch.Generator().manual_seed(2)
    for t in sampler.timesteps:
        x, pred = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        denoised = sampler.step(pred, t, x, generator=gen, return_dict=False)[1]
        ours = DDIMSolver(scheduler).consistency(pred, x, torch.full((2,), int(t)))
        assert torch.allclose(ours, denoised, atol=1e-5), int(t)


def tiny_unet(**overrides) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8, **overrides)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_on_policy_inputs_are_what_the_students_own_sampler_feeds_it(kind):
    """consistency.on_policy: an item at grid point n gets the x that the student's sampler, stepping every grid point
    from pure noise with the item's generator, has at that point: LCMScheduler's (a flow's FlowMatchLCMScheduler's)
    steps, noise draws included, stopped there."""
    cfg = ConsistencyConfig(solver_steps=4)
    solver = make_solver(FLOW if kind == "flow" else SCHEDULE, cfg)
    sampler = solver.sampling_scheduler()
    student = lambda x, t, cond, timestep_cond=None: SimpleNamespace(sample=0.3 * x + 0.01 * t.view(-1, 1, 1, 1) / 1000)
    like, cond, n = torch.zeros(4, 4, 8, 8), torch.zeros(4, 1, 1), torch.tensor([0, 1, 2, 3])
    ours = distill_module.sampler_inputs(student, solver, like, n, cond, None,
                                         [torch.Generator().manual_seed(i) for i in range(4)])
    for i in range(4):
        gen = torch.Generator().manual_seed(i)
        set_steps(sampler, 4, "cpu")
        x = randn_tensor((1, 4, 8, 8), generator=gen)
        for t in sampler.timesteps[: len(solver.grid) - 1 - i]:
            x = sampler.step(student(x, t.expand(1), cond).sample, t, x, generator=gen).prev_sample
        assert torch.allclose(ours[i], x[0], atol=1e-5), i


def test_the_guidance_embedding_is_the_same_in_training_diffusers_and_our_sampler(teacher, monkeypatch):
    """Training embeds g through guidance_embedding; diffusers' StableDiffusionPipeline and our denoise pass
    exactly that for guidance_scale=g, and neither runs the unconditional batch."""
    student = load_pipeline(teacher, device="cpu", dtype="float32")
    unet = student_unet(student.unet, 16)
    seen = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, timestep_cond=None, **kwargs):
        seen.append((sample.shape[0], timestep_cond))
        return forward(self, sample, timestep, encoder_hidden_states, *args, timestep_cond=timestep_cond, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    pipe = StableDiffusionPipeline(vae=student.vae, text_encoder=student.text_encoder, tokenizer=student.tokenizer,
                                   unet=unet, scheduler=LCMScheduler.from_config(SCHEDULE), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe(["a red circle", "a blue star"], num_inference_steps=2, guidance_scale=4.5, output_type="latent")
    expected = guidance_embedding(torch.tensor([4.5, 4.5]), 16)
    assert len(seen) == 2 and all(n == 2 and torch.equal(c, expected) for n, c in seen)
    seen.clear()
    cond = torch.randn(2, 8, 64)
    denoise(unet, make_scheduler("lcm", SCHEDULE), cond, torch.zeros_like(cond), torch.randn(2, 4, 4, 4), num_steps=2,
            guidance_scale=4.5)
    assert len(seen) == 2 and all(n == 2 and torch.equal(c, expected) for n, c in seen)
    # the embedding is of g - 1, the LCM paper's w: g = 1 (no guidance) embeds 0
    assert torch.equal(guidance_embedding(torch.tensor([1.0]), 16), StableDiffusionPipeline.get_guidance_scale_embedding(
        None, torch.tensor([0.0]), embedding_dim=16))


def test_the_student_starts_as_the_teacher_for_every_guidance_scale():
    teacher = tiny_unet()
    student = student_unet(teacher, 32)
    assert student.config.time_cond_proj_dim == 32 and teacher.config.time_cond_proj_dim is None
    x, c = torch.randn(2, 4, 4, 4), torch.randn(2, 8, 64)
    with torch.no_grad():
        ours = student(x, torch.tensor([19, 999]), c, timestep_cond=guidance_embedding(torch.tensor([2.0, 8.0]), 32)).sample
        theirs = teacher(x, torch.tensor([19, 999]), c).sample
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- full-weight run and its export


def test_the_export_samples_in_plain_diffusers_with_lcm_scheduler_at_1_2_and_4_steps(full):
    pipeline = full / "pipeline"
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 10 and pipe.scheduler.config.timestep_scaling == 10.0
    assert pipe.unet.config.time_cond_proj_dim == 16
    info = json.loads((pipeline / "ldm.json").read_text())
    assert info["consistency"]["guidance"] == {"w_min": 2.0, "w_max": 5.0, "embedding_dim": 16, "interval": None,
                                               "embedding_of": "guidance_scale - 1 (diffusers' timestep_cond)"}
    assert info["consistency"]["skip"] == 100 and info["sampling"] == {"scheduler": "lcm", "steps": 4, "guidance_scale": 3.5}
    ours = load_pipeline(full, device="cpu", dtype="float32")  # the run dir resolves to its pipeline
    assert (ours.default_scheduler, ours.default_steps, ours.default_guidance) == ("lcm", 4, 3.5)
    for steps in (1, 2, 4):
        theirs = pipe(["a red circle"], num_inference_steps=steps, guidance_scale=3.5,
                      generator=[torch.Generator().manual_seed(0)], output_type="np").images[0]
        mine = generate(ours, ["a red circle"], seeds=[0], steps=steps, progress=False)[0]["array"]
        assert theirs.shape == (16, 16, 3) and np.isfinite(theirs).all()
        assert np.abs(mine - theirs).max() < 1e-4, steps  # the same sampler, embedding and draws


def test_the_run_writes_metrics_grids_checkpoints_and_the_ema_weights(full):
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert sorted(p.name for p in (full / "samples").iterdir()) == ["step-000002.png", "step-000003.png"]
    assert Image.open(full / "samples" / "step-000003.png").size[1] > Image.open(full / "samples" / "step-000003.png").size[0]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-2", "step-3"]
    exported = unet_weights(full / "pipeline")
    last = next(load_file(p) for p in (full / "checkpoints" / "step-3").glob("model*.safetensors"))
    assert exported.keys() == last.keys() and any(not torch.equal(exported[k], last[k]) for k in last)  # EMA, not last
    assert exported["time_embedding.cond_proj.weight"].abs().sum() > 0  # the guidance embedding trained


def test_infer_and_app_sample_the_student_with_its_defaults(full, tmp_path):
    infer_main([str(full), "--prompt", "a red circle", "--device", "cpu", "--out", str(tmp_path)])
    info = Image.open(tmp_path / "0000-seed0.png").text
    assert (info["scheduler"], info["steps"], info["guidance_scale"]) == ("lcm", "4", "3.5")
    from ldm.app import Demo, Limits

    demo = Demo(load_pipeline(full, device="cpu", dtype="float32"), Limits())
    assert (demo.default_steps, demo.default_guidance) == (4, 3.5) and "lcm" in demo.schedulers
    with pytest.warns(UserWarning, match="distilled for guidance scales 2.0-5.0; 9.0 is outside"):
        generate(load_pipeline(full, device="cpu", dtype="float32"), ["a red circle"], guidance_scale=9.0, progress=False)


def test_a_resumed_run_ends_as_the_run_that_never_stopped(teacher, latents, full, tmp_path):
    args = ["train.ema_decay=0.9", "train.eval_every=2", "consistency.on_policy=0.5"]  # the settings of `full`
    distill(distill_cfg(tmp_path / "cut", teacher, latents, *args, "train.steps=2"))
    resumed = distill(distill_cfg(tmp_path / "cut", teacher, latents, *args, "resume=latest"))
    whole = unet_weights(full / "pipeline")  # the same config, never stopped
    ours = unet_weights(resumed)
    assert all(torch.equal(ours[k], whole[k]) for k in whole)


# ----------------------------------------------------------------------------- LCM-LoRA


def test_a_lora_run_exports_the_merged_student_and_an_lcm_lora_that_loads_onto_the_teacher(teacher, latents, tmp_path,
                                                                                           monkeypatch):
    out = tmp_path / "lcm-lora"
    solved_in = []  # consistency.teacher_dtype: the dtype the teacher's passes ran under, each step

    def spy(unet, solver, x, path, cond, empty, scales, autocast, **kwargs):
        with autocast():
            solved_in.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return teacher_step(unet, solver, x, path, cond, empty, scales, autocast, **kwargs)

    monkeypatch.setattr(distill_module, "teacher_step", spy)
    pipeline = distill(distill_cfg(out, teacher, latents, *LORA, "train.lr=1e-2", "consistency.target_decay=0",
                                   "consistency.teacher_dtype=bf16", "consistency.on_policy=1"))  # as shapes_cpu_lora.yaml
    assert solved_in and set(solved_in) == {torch.bfloat16}
    start, end = unet_weights(teacher / "pipeline"), unet_weights(pipeline)
    assert start.keys() == end.keys()  # no guidance embedding: the teacher's architecture
    adapted = {k for k in start if k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))}
    assert adapted and {k for k in start if not torch.equal(start[k], end[k])} == adapted
    info = json.loads((pipeline / "ldm.json").read_text())
    assert info["sampling"]["guidance_scale"] == 1.0 and info["consistency"]["lora"]["rank"] == 4
    # the LCM-LoRA on the teacher in plain diffusers, with LCMScheduler and no CFG, gives the merged export's images
    base = StableDiffusionPipeline.from_pretrained(teacher / "pipeline", local_files_only=True)
    base.load_lora_weights(out / "lora")
    base.scheduler = LCMScheduler.from_config(base.scheduler.config, original_inference_steps=10)
    merged = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    images = [p(["a red circle"], num_inference_steps=2, guidance_scale=1.0, generator=[torch.Generator().manual_seed(0)],
                output_type="np").images for p in (base, merged)]
    assert np.abs(images[0] - images[1]).max() < 1e-4
    folded = load_pipeline(teacher, device="cpu", dtype="float32", loras=[(out / "lora", 1.0)])
    assert max((folded.unet.state_dict()[k] - end[k]).abs().max().item() for k in end) < 1e-5


# ----------------------------------------------------------------------------- a flow-matching teacher


FLOW = {"num_train_timesteps": 1000, "shift": 2.0, "prediction_type": "flow_prediction"}


def test_the_flow_solver_with_the_exact_velocity_lands_on_the_same_straight_path():
    """Rectified flow's paths are straight for a fixed (x0, eps): one Euler step with the exact velocity eps - x0
    lands on x_s of the same pair, and the grid point below the first is clean data."""
    solver = make_solver(FLOW, ConsistencyConfig(solver_steps=10))
    assert isinstance(solver, FlowSolver) and len(solver.grid) == 10 and solver.previous[0] == 0
    u = torch.arange(1, 11, dtype=torch.float64) / 10
    assert torch.allclose(solver.grid.double(), 1000 * 2 * u / (1 + u), atol=1e-3)  # shifted as the teacher trained
    assert torch.equal(solver.previous[1:], solver.grid[:-1])
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(10, 4, 8, 8, generator=gen), torch.randn(10, 4, 8, 8, generator=gen)
    t, s = solver.grid, solver.previous
    x_s = solver.update(eps - x0, solver.noised(x0, eps, t), t, s)
    assert torch.allclose(x_s, solver.noised(x0, eps, s), atol=1e-5) and torch.allclose(x_s[0], x0[0], atol=1e-5)
    # the consistency function of the exact velocity is x0 everywhere, and x itself at sigma 0 (the boundary)
    assert torch.allclose(solver.consistency(eps - x0, solver.noised(x0, eps, t), t), x0, atol=1e-5)
    assert torch.equal(solver.consistency(eps, x0, torch.zeros(10)), x0)


def test_flow_lcm_steps_on_the_students_grid_and_applies_its_consistency_function():
    """FlowMatchLCMScheduler in ldm.sampling takes the sigmas 1, 3/4, 1/2, 1/4 for 4 steps (shifted), which are
    grid points of a 20-step solver, and each step re-noises the x0 of the function trained."""
    from ldm.sampling import set_steps

    solver = make_solver(FLOW, ConsistencyConfig(solver_steps=20))
    sampler = solver.sampling_scheduler()
    set_steps(sampler, 4, "cpu")
    assert all(torch.isclose(solver.grid, t, atol=1e-2).any() for t in sampler.timesteps)
    assert sampler.sigmas[-1] == 0 and len(sampler.timesteps) == 4
    gen = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    for i, t in enumerate(sampler.timesteps):
        out = sampler.step(v, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        sigma_next = sampler.sigmas[i + 1]
        x0 = solver.consistency(v, x, t.repeat(2))
        assert torch.allclose(out, (1 - sigma_next) * x0 + sigma_next * noise, atol=1e-5), i
        x = out


@pytest.fixture(scope="module")
def flow_student(latents, tmp_path_factory) -> dict:
    """A 2-step flow-matching teacher on the cache, and its student after 3 distillation steps."""
    root = tmp_path_factory.mktemp("flow-distill")
    train_ldm(ldm_cfg(root / "teacher", latents, "train.steps=2", "train.save_every=0", "resume=",
                      "noise.objective=flow", "noise.shift=2.0", "noise.snr_gamma=0"))
    distill(distill_cfg(root / "student", root / "teacher", latents, "consistency.solver_steps=4",
                        "consistency.solver_substeps=2", "consistency.solver_order=2"))  # two Heun steps a skip
    return {"teacher": root / "teacher", "student": root / "student"}


def test_a_flow_teacher_distils_into_a_flow_lcm_student_that_infer_and_diffusers_sample(flow_student):
    pipeline = flow_student["student"] / "pipeline"
    info = json.loads((pipeline / "ldm.json").read_text())
    assert info["objective"] == "flow" and info["sampling"] == {"scheduler": "flow-lcm", "steps": 4, "guidance_scale": 3.5}
    assert info["consistency"]["solver"] == "euler" and info["consistency"]["shift"] == 2.0
    assert (info["consistency"]["solver_substeps"], info["consistency"]["solver_order"]) == (2, 2)
    assert info["training_scheduler"]["prediction_type"] == "flow_prediction"
    ours = load_pipeline(pipeline, device="cpu", dtype="float32")
    assert (ours.default_scheduler, ours.default_steps, ours.default_guidance) == ("flow-lcm", 4, 3.5)
    for steps in (1, 2, 4):
        image = generate(ours, ["a red circle"], seeds=[0], steps=steps, progress=False)[0]
        assert image["scheduler"] == "flow-lcm" and np.isfinite(image["array"]).all()
    with pytest.raises(ValueError, match="scheduler 'lcm' samples diffusion models"):
        generate(ours, ["a red circle"], scheduler="lcm", progress=False)
    # plain diffusers: StableDiffusionPipeline runs the saved flow-ddim (it cannot run a FlowMatch* scheduler), as infer does
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(["a red circle"], num_inference_steps=4, guidance_scale=3.5, generator=[torch.Generator().manual_seed(0)],
                  output_type="np").images[0]
    mine = generate(ours, ["a red circle"], seeds=[0], scheduler="flow-ddim", steps=4, progress=False)[0]["array"]
    assert np.abs(mine - theirs).max() < 1e-4


def test_bench_distill_times_a_flow_student_with_flow_samplers(flow_student, tmp_path):
    """bench/bench_distill.py samples a flow teacher with DPM++ on flow sigmas and its student with flow-lcm."""
    import subprocess
    import sys

    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "bench" / "bench_distill.py"),
                           "--teacher", str(flow_student["teacher"]), "--student", str(flow_student["student"]),
                           "--batch-sizes", "1", "--repeats", "1", "--cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["teacher"]["scheduler"] == "flow-dpm++2m" and figures["student"]["scheduler"] == "flow-lcm"
    assert figures["batch_1"]["ratio"] > 0


# ----------------------------------------------------------------------------- bad input


def test_teachers_the_solver_cannot_distil_are_refused_naming_why(teacher, latents, tmp_path):
    flow = {"num_train_timesteps": 1000, "shift": 3.0, "prediction_type": "flow_prediction"}
    assert teacher_schedule_problem(flow, 50) is None  # the Euler solver's
    assert "use_dynamic_shifting" in teacher_schedule_problem({**flow, "use_dynamic_shifting": True}, 50)
    assert "zero-terminal-SNR" in teacher_schedule_problem({**SCHEDULE, "rescale_betas_zero_snr": True}, 50)
    assert teacher_schedule_problem({**SCHEDULE, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}, 50) is None
    assert "beta_schedule='sigmoid'" in teacher_schedule_problem({**SCHEDULE, "beta_schedule": "sigmoid"}, 50)
    assert "exceeds its 1000 training timesteps" in teacher_schedule_problem(SCHEDULE, 2000)
    # a pipeline on disk: refused when the config is loaded, before any work
    bad = tmp_path / "bad"
    shutil.copytree(teacher / "pipeline", bad)
    record = json.loads((bad / "ldm.json").read_text())
    (bad / "ldm.json").write_text(json.dumps({**record, "training_scheduler": {**SCHEDULE, "beta_schedule": "sigmoid"}}))
    with pytest.raises(ConfigError, match=r"teacher .*bad: beta_schedule='sigmoid'"):
        distill_cfg(tmp_path / "x", bad, latents)
    # and the LCM sampler on a flow model, or a flow sampler on the student: the objective is named
    with pytest.raises(ValueError, match=r"scheduler 'lcm' samples diffusion models, but this model was trained with "
                                         r"noise.objective=flow; use one of: flow-euler"):
        make_scheduler("lcm", flow)
    with pytest.raises(ValueError, match="scheduler 'flow-lcm' samples flow models"):
        make_scheduler("flow-lcm", SCHEDULE)


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_the_teacher_guides_only_the_solver_steps_inside_the_guidance_interval(kind):
    """guidance.interval: the solver's step at t is guided at w where t's noise level (EDM sigma, as the sampler
    measures it) is in (lo, hi], and takes the conditional prediction (scale 1) elsewhere."""
    schedule = scheduler_config(NoiseConfig(objective="flow") if kind == "flow" else NoiseConfig())
    solver = make_solver(schedule, ConsistencyConfig(solver_steps=10))
    sampler = make_scheduler("flow-euler" if kind == "flow" else "ddim", schedule)
    t = solver.grid
    levels = solver.noise_level(t)
    for time, level in zip(t.tolist(), levels.tolist()):
        assert level == pytest.approx(noise_level(sampler, time), rel=1e-4)
    lo, hi = float(levels[2]), float(levels[6])  # grid points 3 to 6 guided
    cfg = DistillConfig.__new__(DistillConfig)  # only its guidance section is read (no teacher to check)
    cfg.guidance = GuidanceConfig(interval=[lo, hi])
    w = torch.full((len(t),), 4.0)
    assert guided_scales(solver, t, w, cfg).tolist() == [1, 1, 1, 4, 4, 4, 4, 1, 1, 1]
    cfg.guidance.interval = None
    assert torch.equal(guided_scales(solver, t, w, cfg), w)


def test_bad_configs_caches_and_teachers_fail_before_any_work(teacher, latents, full, tmp_path):
    with pytest.raises(ConfigError, match="an LCM-LoRA loads onto the teacher's U-Net, which has no guidance-embedding"):
        distill_cfg(tmp_path / "x", teacher, latents, "lora.rank=4")
    with pytest.raises(ConfigError, match=r"would learn an average of \[2.0, 5.0\]; set guidance.w_max = guidance.w_min"):
        distill_cfg(tmp_path / "x", teacher, latents, "guidance.embedding_dim=0")
    with pytest.raises(ConfigError, match="sample_guidance=9.0 is outside the distilled range"):
        distill_cfg(tmp_path / "x", teacher, latents, "sample_guidance=9")
    with pytest.raises(ConfigError, match=r"guidance.interval: need 0 <= lo < hi"):
        distill_cfg(tmp_path / "x", teacher, latents, "guidance.interval=[3.0, 1.0]")
    with pytest.raises(ConfigError, match=r"consistency.teacher_dtype must be one of \['', 'bf16', 'fp16'\], got 'half'"):
        distill_cfg(tmp_path / "x", teacher, latents, "consistency.teacher_dtype=half")
    with pytest.raises(ConfigError, match="unknown config key.*guidance.scale"):
        distill_cfg(tmp_path / "x", teacher, latents, "guidance.scale=3")
    with pytest.raises(ConfigError, match="teacher: no such directory"):
        distill_cfg(tmp_path / "x", tmp_path / "missing", latents)
    with pytest.raises(ConfigError, match="consistency-distilled already"):  # the student is no teacher
        distill(distill_cfg(tmp_path / "x", full, latents))
    # a cache from another VAE than the teacher's
    other = tmp_path / "other"
    shutil.copytree(teacher / "pipeline", other)
    vae = load_file(other / "vae" / "diffusion_pytorch_model.safetensors")
    from safetensors.torch import save_file
    save_file({k: v + 0.01 for k, v in vae.items()}, other / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CacheMismatchError, match=r"encoded by the teacher's VAE .*\n  vae_hash: cache has"):
        distill(distill_cfg(tmp_path / "y", other, latents))
    assert not (tmp_path / "y").exists()  # refused before the run directory is made
    # the original single-file layout has no guidance embedding: the full student's export is refused, naming it
    from ldm.export import export_single_file
    with pytest.raises(ValueError, match="'time_embedding.cond_proj.weight' has no place in the original SD layout"):
        export_single_file(full / "pipeline", tmp_path / "student.safetensors")
    # the command line says what is wrong without a traceback
    with pytest.raises(SystemExit, match="config error: .*consistency-distilled already"):
        distill_main([f"out_dir={tmp_path / 'z'}", f"teacher={full}", f"cache={latents['cache']}", *RUN])


@pytest.mark.parametrize("name", ["shapes_cpu", "shapes_cpu_lora", "emoji_cpu"])
def test_the_shipped_distill_configs_fit_the_demo_unet(name, tmp_path):
    """configs/distill/*.yaml load, and their LoRA targets name linear layers of the U-Net that
    configs/ldm/shapes_cpu.yaml builds (its proj_in/proj_out are 1x1 convolutions)."""
    from ldm.models.lora import add_lora
    from ldm.models.unet import build_unet
    from ldm.train.ldm import LDMTrainConfig

    configs = Path(__file__).resolve().parent.parent / "configs"
    here = [f"teacher={tmp_path}", f"cache={tmp_path}"]  # the configs name runs/demo, which a fresh clone has not made
    cfg = load_config(DistillConfig, configs / "distill" / f"{name}.yaml", here)
    unet_cfg = load_config(LDMTrainConfig, configs / "ldm" / "shapes_cpu.yaml", [f"vae={tmp_path}", f"cache={tmp_path}",
                                                                                   f"text.encoder={tmp_path}"]).model
    unet = build_unet(unet_cfg, latent_channels=4, sample_size=16, cross_attention_dim=64)
    if cfg.lora.rank:
        assert add_lora(unet, cfg.lora)
    assert cfg.guidance.w_min <= cfg.guidance.w_max
