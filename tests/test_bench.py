"""The benchmarks (bench/) keep working: each runs with --tiny on the CPU, as a separate process,
and prints ours, the plain-diffusers baseline and their ratio. The figures themselves are not
checked: CPU timings of tiny models say nothing about a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_bench(script: str, tmp_path: Path, *args: str) -> tuple[dict, str]:
    """(the figures it wrote with --json, its stdout)."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, even on a machine with a GPU
    done = subprocess.run([sys.executable, str(BENCH / script), "--tiny", "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def shapes_folder(root: Path, n: int) -> Path:
    """An image folder of n shapes scenes at 32 px with their captions in metadata.jsonl."""
    from ldm.data.shapes import ShapesDataset

    root.mkdir()
    rows = []
    for i, item in enumerate(ShapesDataset(size=n, resolution=32, seed=5)):
        item["image"].save(root / f"{i:02d}.png")
        rows.append(json.dumps({"file_name": f"{i:02d}.png", "text": item["caption"]}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_bench_train_prints_both_sides_and_the_ratio(tmp_path):
    figures, stdout = run_bench("bench_train.py", tmp_path, "--steps", "2", "--warmup", "1")
    assert positive(figures["baseline_images_per_s"], figures["baseline_precomputed_images_per_s"],
                    figures["ours_images_per_s"], figures["ratio"])
    assert figures["ratio"] == pytest.approx(figures["ours_images_per_s"] / figures["baseline_images_per_s"], rel=0.01)
    assert "images/s" in stdout and "ratio" in stdout


def test_gpu_figures_script_runs_sampling_and_encoding_into_one_file(tmp_path):
    """bench/gpu_figures.sh sample at CPU size (TINY=1): bench_sample.py and bench_encode.py, each
    under its time limit, their figures merged into one JSON and their output into one log."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TINY": "1", "PY": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", str(BENCH / "gpu_figures.sh"), "sample"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "sample.json").read_text())
    assert sorted(figures) == ["encode", "sample"]
    for batch in (1, 4):
        row = figures["sample"][f"batch_{batch}"]
        assert positive(row["baseline_s_per_image"], row["ours_s_per_image"], row["ratio"])
        assert row["max_image_difference"] < 1e-4  # the same images: both sides did the same work
    encode = figures["encode"]
    assert positive(encode["baseline_images_per_s"], encode["ours_images_per_s"], encode["ratio"])
    log = (tmp_path / "sample.log").read_text()
    assert "batch 4: StableDiffusionPipeline" in log and "ldm encode" in log
    assert "== sample: exit 0" in log and "== encode: exit 0" in log


def test_gpu_figures_script_keeps_inside_its_budget_and_says_what_it_skipped(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TINY": "1", "PY": sys.executable, "OUT": str(tmp_path), "BUDGET": "35"}
    done = subprocess.run(["bash", str(BENCH / "gpu_figures.sh"), "encode", "memory", "encode"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "encode-memory-encode.json").read_text())
    assert figures == {name: {"error": "skipped: no time left in the budget of 35 s"} for name in ("encode", "memory")}
    assert "== encode: skipped" in (tmp_path / "encode-memory-encode.log").read_text()
    bad = subprocess.run(["bash", str(BENCH / "gpu_figures.sh"), "sampling"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown bench sampling" in bad.stderr


def test_bench_train_memory_mode_reports_every_row(tmp_path):
    figures, stdout = run_bench("bench_train.py", tmp_path, "--memory")
    assert len(figures["rows"]) == 12  # 4 ways to hold the weights and optimizer state x batch 1, 2, 4
    assert all("error" not in row for key, row in figures["rows"].items() if key.startswith("LoRA"))
    for key, row in figures["rows"].items():
        assert ("peak_gb" in row) != ("error" in row), key  # measured (None on a CPU), or skipped with the reason
    assert any("peak_gb" in row for row in figures["rows"].values())


def test_text_encoder_comparison_runs_every_stage_and_scores_both(tmp_path):
    """bench/text_encoders.py at two steps per stage: both U-Nets scored, CLIP retrieval and times reported."""
    out = tmp_path / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(BENCH / "text_encoders.py"), "--out", str(out), "--steps", "2", "--n", "2",
                           "--data-size", "128", "--json", str(tmp_path / "figures.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    for name in ("random", "trained"):
        assert set(figures[name]) == {"color", "shape", "size", "position", "background", "all"}
        assert all(0 <= v <= 1 for v in figures[name].values())
        assert (out / f"ldm-{name}" / "adherence" / "adherence.json").is_file()
        assert positive(figures["wall_s"][f"ldm_{name}"], figures["wall_s"][f"encode_{name}"])
    # the second U-Net was conditioned on the text tower of the CLIP trained here, the first one not (the
    # export keeps the layers the configs' clip_skip uses: every tensor it has is the CLIP's)
    from safetensors.torch import load_file
    clip = load_file(out / "clip" / "text_encoder" / "model.safetensors")
    for name, same in (("trained", True), ("random", False)):
        exported = load_file(out / f"ldm-{name}" / "pipeline" / "text_encoder" / "model.safetensors")
        assert exported.keys() <= clip.keys() and any("token_embedding" in k for k in exported)
        assert all(exported[k].equal(clip[k]) for k in exported) == same, name
    assert figures["clip_retrieval"]["candidates"] == 100
    assert "trained - random" in done.stdout

    # bench/objectives.py on the same CLIP, VAE and cache: a U-Net per objective, each scored at 2 and 1 steps
    ran = subprocess.run([sys.executable, str(BENCH / "objectives.py"), "--demo", str(out), "--cache",
                          str(out / "latents-trained"), "--out", str(tmp_path / "objectives"), "--steps", "2", "--n", "2",
                          "--sample-steps", "2", "1", "--json", str(tmp_path / "objectives.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    objectives = json.loads((tmp_path / "objectives.json").read_text())
    assert list(objectives["objectives"]) == ["eps", "v", "flow"]
    for name, row in objectives["objectives"].items():
        assert set(row["scores"]) == {"2", "1"} and all(0 <= row["scores"][s]["all"] <= 1 for s in ("2", "1"))
        ldm_json = json.loads((tmp_path / "objectives" / f"ldm-{name}" / "pipeline" / "ldm.json").read_text())
        assert (ldm_json.get("objective", "diffusion"), row["sampler"]) == {
            "eps": ("diffusion", "dpm++2m"), "v": ("diffusion", "dpm++2m"), "flow": ("flow", "flow-dpm++2m")}[name]
    assert "eps | " in ran.stdout and "flow | " in ran.stdout

    # on real images (--data): the same U-Net scored by FID/KID and caption retrieval on the folder's held-out images
    folder = shapes_folder(tmp_path / "folder", 8)
    ran = subprocess.run([sys.executable, str(BENCH / "objectives.py"), "--demo", str(out), "--cache",
                          str(out / "latents-trained"), "--out", str(tmp_path / "objectives-q"), "--objectives", "eps",
                          "--steps", "2", "--n", "2", "--sample-steps", "1", "--data", str(folder),
                          "--json", str(tmp_path / "objectives-q.json")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    quality = json.loads((tmp_path / "objectives-q.json").read_text())
    assert quality["measure"].startswith("FID, KID and caption retrieval on 2 held-out images")
    row = quality["objectives"]["eps"]["scores"]["1"]
    assert row["n"] == 2 and row["features"].startswith(f"clip:{out / 'clip'}")
    assert positive(row["fid"]) and 0 <= row["top1"] <= 1 and row["top1_ceiling"] >= row["top1_chance"]
    assert (tmp_path / "objectives-q" / "quality-eps-1" / "eval.json").is_file()
    assert "eps | " in ran.stdout and "FID / top-1" in ran.stdout


def test_bench_distill_times_the_student_against_its_teacher(tmp_path):
    figures, stdout = run_bench("bench_distill.py", tmp_path, "--batch-sizes", "2", "--repeats", "1")
    row = figures["batch_2"]
    assert positive(row["teacher_s_per_image"], row["student_s_per_image"], row["ratio"])
    assert figures["teacher"]["steps"] == 20 and figures["student"] == {**figures["student"], "scheduler": "lcm", "steps": 4}
    assert "ratio" in stdout


def test_latent_locality_measures_how_far_a_code_is_from_additive(tmp_path):
    """bench/latent_locality.py (issue #23): perfectly additive codes (colour + background) miss by
    nothing and move by the same amount for every colour; a code moved on its own is found; the
    command runs on a saved AutoencoderKL and names what it measured."""
    sys.path.insert(0, str(BENCH))
    try:
        import latent_locality
    finally:
        sys.path.remove(str(BENCH))
    import torch
    from diffusers import AutoencoderKL

    from ldm.data.shapes import BACKGROUNDS, COLORS

    gen = torch.Generator().manual_seed(0)
    colour = {c: torch.randn(16, generator=gen) for c in COLORS}
    background = {b: torch.randn(16, generator=gen) for b in BACKGROUNDS}
    codes = {(c, b): colour[c] + background[b] for c in COLORS for b in BACKGROUNDS}
    additive = latent_locality.locality(codes)
    assert additive["additive_miss"] == pytest.approx(0, abs=1e-5)
    assert len(set(additive["black_vs_gray"].values())) == 1
    codes["green", "black"] = codes["green", "black"] + 3.0
    moved = latent_locality.locality(codes)
    assert moved["additive_miss"] == pytest.approx(12.0, abs=1e-2)  # 3 in each of 16 dimensions
    assert moved["black_vs_gray"]["green"] > max(v for c, v in moved["black_vs_gray"].items() if c != "green")

    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4).save_pretrained(vae_dir)
    out = tmp_path / "locality.json"
    done = subprocess.run([sys.executable, str(BENCH / "latent_locality.py"), str(vae_dir), "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["held_out"] == "green on black" and len(figures["nearest"]) == 4
    assert set(figures["black_vs_gray"]) == set(COLORS) and figures["spread_on_black"] > 0
