#!/usr/bin/env python
"""A distilled student against its teacher, one process: time per image, and with --adherence the analyzer's scores.

    python bench/bench_distill.py --teacher runs/demo/ldm --student runs/distill/shapes_cpu
    python bench/bench_distill.py --teacher runs/demo/ldm --student runs/distill/shapes_cpu --adherence 128 --seed 0
    python bench/bench_distill.py --tiny        # random tiny teacher and student (tests/test_bench.py)

Baseline: the teacher as the demo samples it, DPM++(2M) in 20 steps with classifier-free guidance 4
(two U-Net passes a step, batched; on flow sigmas for a flow teacher). Ours: the consistency-distilled
student (distill.py) with its own sampler (LCMScheduler, or FlowMatchLCMScheduler for a flow teacher's
student) in 4 steps (--student-steps), the guidance folded into one pass a step. Both through
`ldm.infer.generate`, on the same device and dtype (float32 on a CPU), the same prompts and one
CPU generator per image seeded alike; timed end to end (text encoding, denoising, VAE decode, PIL
conversion). For each batch size each side runs once to warm up, then --repeats times taking
turns; the best time counts, and the ratio is the teacher's time over the student's.

--train-cost TEACHER_RUN STUDENT_RUN: seconds per optimiser step of stage 3 with the teacher run's config.yaml
and of distillation with the student run's, each for --cost-steps steps into a temporary directory,
teacher, student, teacher again in one process (so a drift in machine load shows), the median of the
times between steps in their metrics.jsonl after 5 warm-up steps; with the runs' step counts, the distillation's cost as a
fraction of the teacher's U-Net training, measured under the same conditions.

--adherence N: `ldm.evaluate.prompt_adherence` over N balanced prompts (seed --seed: the prompts and
the images' seeds), for the teacher as above and the student at each of --adherence-steps; the
student's all-five score as a fraction of the teacher's. Tune on a seed other than the one reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from bench.common import report, synchronize  # noqa: E402

from ldm.diffusion import objective_of  # noqa: E402
from ldm.infer import generate, load_pipeline  # noqa: E402
from ldm.sampling import DEFAULT_SAMPLERS  # noqa: E402

PROMPTS = ["a large red circle on the left, on a gray background", "a small blue star at the top, on a black background",
           "a large yellow square in the center, on a white background", "a small green triangle on the right, on a gray background"]
TEACHER = dict(scheduler="dpm++2m", steps=20, guidance_scale=4.0)  # the demo's sampling (configs/ldm/shapes_cpu.yaml);
                                                                     # a flow teacher: its flow sampler, flow-dpm++2m


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", help="the teacher: run dir or pipeline dir")
    p.add_argument("--student", help="the distilled student: distill.py's run dir or pipeline dir")
    p.add_argument("--tiny", action="store_true", help="random tiny teacher and student at 32 px (a CPU run)")
    p.add_argument("--student-steps", type=int, default=4, help="the student's steps in the timing")
    p.add_argument("--student-guidance", type=float, help="the student's guidance scale (default: its recommended one)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="images per call")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch size; the best counts")
    p.add_argument("--adherence", type=int, default=0, metavar="N", help="also score N prompts with the shapes analyzer")
    p.add_argument("--adherence-steps", type=int, nargs="+", default=[1, 2, 4], help="the student's steps scored")
    p.add_argument("--seed", type=int, default=0, help="prompts and image seeds of --adherence (the demo reports 0)")
    p.add_argument("--train-cost", nargs=2, metavar=("TEACHER_RUN", "STUDENT_RUN"),
                   help="also time training steps with these runs' config.yaml (stage 3 and distill.py)")
    p.add_argument("--cost-steps", type=int, default=25, help="steps of each --train-cost run (5 of them warm-up)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if not args.tiny and not (args.teacher and args.student):
        p.error("give --teacher and --student, or --tiny")
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    return args


def save_tiny(root: Path) -> tuple[Path, Path]:
    """A random tiny teacher pipeline and a student made from it as distill.py makes one (no training)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.models.presets import SD_SCHEDULER_CONFIG, unet_config, vae_config
    from ldm.models.text import TEXT_PRESETS, build_tokenizer
    from ldm.sampling import make_scheduler
    from ldm.train.distill import ConsistencyConfig, lcm_scheduler, student_unet

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS["tiny"]))
    unet = UNet2DConditionModel(**unet_config("tiny", cross_attention_dim=text_encoder.config.hidden_size, sample_size=8))
    parts = dict(vae=AutoencoderKL(**vae_config("tiny-f4")), text_encoder=text_encoder, tokenizer=build_tokenizer(),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    schedule = {**SD_SCHEDULER_CONFIG, "prediction_type": "epsilon"}
    StableDiffusionPipeline(unet=unet, scheduler=make_scheduler("dpm++2m", schedule), **parts).save_pretrained(root / "teacher")
    student = student_unet(unet, 256)
    StableDiffusionPipeline(unet=student, scheduler=lcm_scheduler(schedule, ConsistencyConfig()), **parts).save_pretrained(
        root / "student")
    (root / "student" / "ldm.json").write_text('{"sampling": {"scheduler": "lcm", "steps": 4, "guidance_scale": 4.0}}')
    return root / "teacher", root / "student"


def sampling_of(teacher, student, args) -> tuple[dict, dict]:
    """(teacher's, student's) settings: the teacher as the demo samples it (DPM++ 2M, on flow sigmas for a flow
    model), the student with its own sampler (lcm, or flow-lcm for a flow student) in --student-steps."""
    teacher_settings = {**TEACHER, "scheduler": DEFAULT_SAMPLERS[objective_of(teacher.base_scheduler_config)]}
    return teacher_settings, dict(scheduler=student.default_scheduler, steps=args.student_steps,
                                  guidance_scale=args.student_guidance)


def timing(teacher, student, args) -> dict:
    teacher_settings, student_settings = sampling_of(teacher, student, args)
    sides = {"teacher": (teacher, teacher_settings), "student": (student, student_settings)}
    figures = {}
    for batch in args.batch_sizes:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]

        def run(pipe, settings):
            generate(pipe, prompts, seeds=list(range(batch)), batch_size=batch, progress=False, **settings)
            synchronize(args.device)

        for pipe, settings in sides.values():  # warm-up
            run(pipe, settings)
        times = {name: [] for name in sides}
        for _ in range(args.repeats):  # the sides take turns, so a drift in machine load hits both
            for name, (pipe, settings) in sides.items():
                t0 = time.perf_counter()
                run(pipe, settings)
                times[name].append(time.perf_counter() - t0)
        row = {f"{name}_s_per_image": round(min(t) / batch, 5) for name, t in times.items()}
        row["ratio"] = round(row["teacher_s_per_image"] / row["student_s_per_image"], 2)
        figures[f"batch_{batch}"] = row
        print(f"batch {batch}: teacher ({teacher_settings['scheduler']}, {TEACHER['steps']} steps, CFG {TEACHER['guidance_scale']}) "
              f"{row['teacher_s_per_image']:.4f} s/image | student ({student_settings['scheduler']}, {args.student_steps} steps) "
              f"{row['student_s_per_image']:.4f} s/image | ratio {row['ratio']:.2f}x", flush=True)
    return figures


def seconds_per_step(run_dir: Path, warmup: int = 5) -> float:
    """The median time between consecutive steps after `warmup` (log_every=1): a step slowed by other work on a
    shared machine, or a process paused for a while, moves the median little."""
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    times = [r["time"] for r in records if r["step"] >= warmup]
    return statistics.median(b - a for a, b in zip(times, times[1:]))


def train_cost(args) -> dict:
    from ldm.config import load_config
    from ldm.train.distill import DistillConfig, distill
    from ldm.train.ldm import LDMTrainConfig, train_ldm

    teacher_run, student_run = map(Path, args.train_cost)
    common = [f"train.steps={args.cost_steps}", "train.log_every=1", "train.eval_every=0", "train.save_every=0", "resume="]
    teacher_cfg = load_config(LDMTrainConfig, teacher_run / "config.yaml")
    student_cfg = load_config(DistillConfig, student_run / "config.yaml")
    timed = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cls, run) in enumerate([("teacher", LDMTrainConfig, teacher_run), ("student", DistillConfig, student_run),
                                              ("teacher", LDMTrainConfig, teacher_run)]):
            quiet = ["validation.quality_n=0", "validation.prompts=[]"] if cls is LDMTrainConfig else ["validation.prompts=[]"]
            cfg = load_config(cls, run / "config.yaml", [f"out_dir={tmp}/{i}", *common, *quiet])
            (train_ldm if cls is LDMTrainConfig else distill)(cfg)
            timed.append((name, seconds_per_step(Path(tmp) / str(i))))
            print(f"{name}: {timed[-1][1]:.3f} s per step (batch {cfg.train.batch_size})", flush=True)
    teacher_s = (timed[0][1] + timed[2][1]) / 2
    student_s = timed[1][1]
    cost = {"teacher_s_per_step": [round(timed[0][1], 4), round(timed[2][1], 4)], "student_s_per_step": round(student_s, 4),
            "teacher_steps": teacher_cfg.train.steps, "student_steps": student_cfg.train.steps,
            "teacher_batch": teacher_cfg.train.batch_size, "student_batch": student_cfg.train.batch_size}
    cost["fraction"] = round(student_s * student_cfg.train.steps / (teacher_s * teacher_cfg.train.steps), 3)
    print(f"distillation: {cost['student_steps']} steps x {student_s:.3f} s = {cost['fraction']:.0%} of the teacher's "
          f"{cost['teacher_steps']} steps x {teacher_s:.3f} s", flush=True)
    return {"train_cost": cost}


def adherence(teacher, student, args) -> dict:
    from ldm.evaluate import format_scores, prompt_adherence

    teacher_settings, student_settings = sampling_of(teacher, student, args)
    scores = {"teacher": prompt_adherence(teacher, n=args.adherence, seed=args.seed, batch_size=32, **teacher_settings)}
    print(f"teacher, {TEACHER['steps']} steps: {format_scores(scores['teacher'])}", flush=True)
    for steps in args.adherence_steps:
        name = f"student_{steps}_steps"
        scores[name] = prompt_adherence(student, n=args.adherence, seed=args.seed, batch_size=32,
                                        **{**student_settings, "steps": steps})
        scores[name]["of_teacher"] = round(scores[name]["all"] / max(scores["teacher"]["all"], 1e-9), 3)
        print(f"student, {steps} steps: {format_scores(scores[name])} ({scores[name]['of_teacher']:.0%} of the "
              f"teacher's all-five)", flush=True)
    return {"adherence": {"n": args.adherence, "seed": args.seed, **scores}}


def main(argv=None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_tiny(Path(tmp)) if args.tiny else (args.teacher, args.student)
        teacher, student = (load_pipeline(p, device=str(args.device), dtype=torch.float32) for p in paths)
        args.student_guidance = args.student_guidance if args.student_guidance is not None else student.default_guidance
        figures = {"device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
                   "threads": torch.get_num_threads()}
        teacher_settings, student_settings = sampling_of(teacher, student, args)
        figures["teacher"] = {**teacher_settings, "path": str(paths[0])}
        figures["student"] = {**student_settings, "path": str(paths[1])}
        figures.update(timing(teacher, student, args))
        if args.adherence:
            figures.update(adherence(teacher, student, args))
    if args.train_cost:
        figures.update(train_cost(args))
    return report(figures, None, args.json)


if __name__ == "__main__":
    main()
