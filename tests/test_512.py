"""The 512 px GPU presets on the CPU (issue #19): every stage at the mission's full size.

`configs/{clip,vae,encode,ldm}/shapes_gpu.yaml` chained by `ldm.demo.run_demo`, as
`python demo.py --preset shapes_gpu` runs them, with the models exactly as the presets define
them (kl-f8 VAE [64, 128, 256, 256] trained on 256 px crops of 512 px images, 512 px encoding
to 64x64x4 latents, the "small" U-Net on those latents, the GPU CLIP's text tower). Only what
sets the run's length is cut: steps, dataset sizes, batch sizes, evaluation cadence, and the
precision (fp32, what the library itself picks on a CPU). Then one 512x512 image per scheduler
through `ldm.infer`. So the 512 px path is known to work before any GPU is lent.

Cost on the project's 2-core machine: about 250 CPU-seconds (two torch threads; most of it
512 px VAE encodes/decodes at ~6/~11 s each and "small" U-Net passes on 64x64 latents), so
about 2-2.5 minutes with both cores free (10.5 min at a load of 9); peak RSS 3.4 GB.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from ldm.data.cache import open_cache
from ldm.demo import run_demo
from ldm.infer import generate, load_pipeline

PROMPT = "a large red circle on the left, on a gray background"
DATA = ["data.source.size=2", "data.eval_size=1"]  # px sizes stay the presets' (512; the CLIP's 64)
CPU = ["train.steps=1", "train.batch_size=1", "train.warmup_steps=0", "train.mixed_precision=no",
       "train.eval_every=0", "train.save_every=0"]
OVERRIDES = {
    "clip": ["data.source.size=8", "data.eval_size=4", *CPU, "train.batch_size=4", "retrieval_candidates=4"],
    "vae": [*DATA, *CPU],
    "encode": [*DATA, "batch_size=2"],
    "ldm": [*CPU, "validation.steps=2", "validation.seeds=[0]", f"validation.prompts=[{PROMPT}]",
            "validation.held_out_batches=1"],
}


pytestmark = pytest.mark.slow  # over 2 minutes on 2 cores; .ci/run still runs it


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu512")
    # n_eval=2: one small and one large object (run_demo prints the score of each size)
    summary = run_demo(out, preset="shapes_gpu", n_eval=2, overrides=OVERRIDES)
    return out, summary


def test_every_stage_runs_at_512px_with_the_preset_models(run):
    out, summary = run
    assert set(summary["timings_s"]) == {"clip_s", "vae_s", "encode_s", "ldm_s", "sample_s"}

    # stage 1: the kl-f8 VAE, its latent scale measured on the (512 px) training images
    vae = AutoencoderKL.from_pretrained(out / "vae" / "vae")
    assert list(vae.config.block_out_channels) == [64, 128, 256, 256] and vae.config.latent_channels == 4
    vae_eval = json.loads((out / "vae" / "eval.json").read_text())
    assert vae_eval["downsample_factor"] == 8
    assert vae_eval["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert np.isfinite(vae.config.scaling_factor) and vae.config.scaling_factor != pytest.approx(0.18215)
    assert (out / "vae" / "recon-final.png").exists()

    # stage 2: 512 px images -> 64x64x4 latents, recorded in the manifest
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert manifest["transform"]["resolution"] == 512 and manifest["downsample_factor"] == 8
    assert manifest["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    assert manifest["splits"]["train"]["count"] == 2 and manifest["splits"]["eval"]["count"] == 1
    z = open_cache(out / "latents").latents([0, 1], generator=torch.Generator().manual_seed(0))
    assert z.shape == (2, 4, 64, 64) and torch.isfinite(z).all()

    # stage 3: the "small" U-Net, exported for 64x64 latents = 512 px images
    pipe = StableDiffusionPipeline.from_pretrained(out / "ldm" / "pipeline", local_files_only=True)
    assert pipe.unet.config.sample_size == 64
    assert list(pipe.unet.config.block_out_channels) == [128, 256, 256]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 256
    info = json.loads((out / "ldm" / "pipeline" / "ldm.json").read_text())
    assert info["latent_size"] == [64, 64] and info["image_size"] == [512, 512]
    assert (out / "ldm" / "samples" / "step-000001.png").exists()
    assert (out / "adherence-grid.png").exists()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_sampling_a_512px_image(run, scheduler):
    out, _ = run
    pipe = load_pipeline(out / "ldm", device="cpu")
    [result] = generate(pipe, [PROMPT], seeds=[0], scheduler=scheduler, steps=2, guidance_scale=4.0)
    assert result["image"].size == (512, 512) and result["scheduler"] == scheduler
    pixels = result["array"]
    assert pixels.shape == (512, 512, 3) and np.isfinite(pixels).all() and pixels.std() > 0
