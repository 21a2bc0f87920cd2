"""One tiny run of each stage on CPU, chained as a user chains them, checking what each wrote."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file

from ldm.config import load_config
from ldm.data.cache import open_cache
from ldm.data.shapes import is_excluded, parse_caption
from ldm.demo import run_demo
from ldm.infer import generate, load_pipeline
from ldm.train.encode import EncodeConfig, encode_dataset
from ldm.train.ldm import LDMTrainConfig, train_ldm
from ldm.train.vae import VAETrainConfig, train_vae

ROOT = Path(__file__).resolve().parent.parent
DATA = ["data.source.size=48", "data.source.resolution=32", "data.transform.resolution=32", "data.eval_size=8"]
VAE = ["model.preset=tiny-f4", "model.block_out_channels=null", "model.latent_channels=null", "crop_size=0", "model.norm_num_groups=null", "model.layers_per_block=null",
       "train.steps=3", "train.batch_size=4", "train.warmup_steps=0", "train.save_every=2", "scale_images=32"]
LDM = ["model.block_out_channels=[32, 64]", "model.down_block_types=[CrossAttnDownBlock2D, DownBlock2D]",
       "model.up_block_types=[UpBlock2D, CrossAttnUpBlock2D]", "model.attention_head_dim=8", "train.steps=3",
       "train.batch_size=4", "train.warmup_steps=0", "train.eval_every=2", "train.save_every=2",
       "validation.steps=2", "validation.seeds=[0]", "validation.held_out_batches=1"]
CLIP = ["data.source.size=32", "data.source.resolution=16", "data.transform.resolution=16", "data.eval_size=8",
        "retrieval_candidates=8", "model.embed_dim=32", "model.image_width=32", "model.image_layers=1",
        "model.image_head_width=16", "model.patch_size=8", "model.text_width=32", "model.text_layers=2",
        "model.text_heads=2", "train.steps=2", "train.batch_size=16", "train.warmup_steps=0"]
TINY = {"clip": CLIP, "vae": DATA + VAE, "encode": DATA + ["shard_size=16", "batch_size=8"], "ldm": LDM}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    vae_cfg = load_config(VAETrainConfig, ROOT / "configs/vae/shapes_cpu.yaml", [f"out_dir={out / 'vae'}", *TINY["vae"]])
    vae_dir = train_vae(vae_cfg)
    enc_cfg = load_config(EncodeConfig, ROOT / "configs/encode/shapes_cpu.yaml",
                          [f"vae={vae_dir}", f"out_dir={out / 'latents'}", "text.encoder=tiny", *TINY["encode"]])
    cache_dir = encode_dataset(enc_cfg)
    ldm_cfg = load_config(LDMTrainConfig, ROOT / "configs/ldm/shapes_cpu.yaml",
                          [f"out_dir={out / 'ldm'}", f"cache={cache_dir}", f"vae={vae_dir}", "text.encoder=tiny", *TINY["ldm"]])
    pipeline_dir = train_ldm(ldm_cfg)
    return {"out": out, "vae": vae_dir, "cache": cache_dir, "pipeline": pipeline_dir}


def test_stage1_writes_an_autoencoderkl_with_measured_scale(stages):
    vae = AutoencoderKL.from_pretrained(stages["vae"])
    assert vae.config.scaling_factor != pytest.approx(0.18215)
    run = stages["out"] / "vae"
    results = json.loads((run / "eval.json").read_text())
    assert {"psnr", "ssim", "latent_std"} <= set(results)
    assert (run / "recon-final.png").exists() and (run / "config.yaml").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-2", "step-3"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("rec" in line for line in lines)


def test_stage2_cache_matches_the_vae(stages):
    manifest = json.loads((stages["cache"] / "manifest.json").read_text())
    vae = AutoencoderKL.from_pretrained(stages["vae"])
    assert manifest["splits"]["train"]["count"] == 48 and manifest["splits"]["eval"]["count"] == 8
    assert manifest["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    cache = open_cache(stages["cache"])
    z = cache.latents([0, 1, 2, 3], generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 8, 8) and torch.isfinite(z).all()
    assert all(isinstance(c[0], str) and c[0] for c in cache.captions)


def test_stage3_exports_a_pipeline_diffusers_loads(stages):
    pipe = StableDiffusionPipeline.from_pretrained(stages["pipeline"], local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    info = json.loads((stages["pipeline"] / "ldm.json").read_text())
    assert info["caption_dropout"] == pytest.approx(0.1)
    assert info["training_scheduler"]["prediction_type"] == pipe.scheduler.config.prediction_type
    # the same held-out images, recorded by every stage: VAE eval.json, cache manifest, ldm.json
    vae_split = json.loads((stages["out"] / "vae" / "eval.json").read_text())["split"]
    manifest = json.loads((stages["cache"] / "manifest.json").read_text())
    assert info["split"] == manifest["split"] == vae_split
    assert vae_split["rule"] == "shapes-seed" and vae_split["count"] == 8 and len(vae_split["keys_sha256"]) == 64
    run = stages["out"] / "ldm"
    assert (run / "samples" / "step-000002.png").exists() and (run / "samples" / "step-000003.png").exists()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in line for line in lines) and any("loss" in line for line in lines)


def test_generated_images_have_the_native_size(stages):
    pipe = load_pipeline(stages["out"] / "ldm", device="cpu")
    out = generate(pipe, ["a large red circle on the left, on a gray background"], seeds=[3], steps=2, guidance_scale=2.0)
    assert out[0]["image"].size == (32, 32)


def test_demo_runs_end_to_end_and_scores(stages, tmp_path):
    overrides = {**TINY, "ldm": TINY["ldm"] + ["train.eval_every=0", "train.save_every=0"]}
    summary = run_demo(tmp_path, n_eval=8, overrides=overrides)
    assert set(summary["adherence"]) >= {"color", "shape", "size", "position", "background"}
    # the U-Net is conditioned on the text tower of the CLIP the demo trained first
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "ldm" / "pipeline")
    clip_tower = load_file(tmp_path / "clip" / "text_encoder" / "model.safetensors")
    exported = pipe.text_encoder.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in clip_tower.items() if k in exported)
    assert {k for k in clip_tower if k in exported} and pipe.text_encoder.config.hidden_size == 32
    assert (tmp_path / "adherence-grid.png").exists() and (tmp_path / "summary.json").exists()


def test_demo_heldout_keeps_combinations_out_of_every_stage_and_scores_them_apart(tmp_path):
    """`demo.py --heldout` (issue #23): the combinations never reach the CLIP or the cache (the VAE,
    which reads no text, sees every image), and adherence.json has each held-out combination's
    scores and VAE ceiling beside the seen ones'."""
    from ldm.demo import HELDOUT

    overrides = {**TINY, "ldm": TINY["ldm"] + ["train.eval_every=0", "train.save_every=0"]}
    summary = run_demo(tmp_path, n_eval=8, overrides=overrides, heldout=HELDOUT)
    record = json.loads((tmp_path / "adherence.json").read_text())
    assert record == json.loads(json.dumps(summary["composition"]))
    assert [row["combination"] for row in record["heldout"]] == HELDOUT
    assert {row["kind"] for row in record["heldout"]} == {"color + shape", "position + shape", "background + color"}
    assert record["seen"]["n"] == 8 and set(record["seen"]["scores"]) >= {"color", "shape", "all"}
    for i, _ in enumerate(HELDOUT):
        prompts = json.loads((tmp_path / f"heldout-{i}.json").read_text())["prompts"]
        assert len(prompts) == 32 and all(is_excluded(parse_caption(p), [HELDOUT[i]]) for p in prompts)
    seen = json.loads((tmp_path / "seen.json").read_text())["prompts"]
    assert not any(is_excluded(parse_caption(p), HELDOUT) for p in seen)
    assert (tmp_path / "seen-grid.png").exists() and (tmp_path / "heldout-0-grid.png").exists()
    # what every stage trained on: the exclusion is in each config and in the cache's manifest
    assert yaml.safe_load((tmp_path / "clip" / "config.yaml").read_text())["data"]["source"]["exclude"] == HELDOUT
    assert yaml.safe_load((tmp_path / "vae" / "config.yaml").read_text())["data"]["source"]["exclude"] == []
    for row in record["heldout"]:
        assert set(row["vae_ceiling"]) >= {"color", "shape", "all"} and 0.0 <= row["vae_ceiling"]["all"] <= 1.0
    assert json.loads((tmp_path / "latents" / "manifest.json").read_text())["source"]["exclude"] == HELDOUT


def test_the_gpu_configs_chain_at_cpu_size(tmp_path):
    """configs/*/shapes_gpu.yaml with their models as they are (kl-f8 VAE, "small" U-Net, the
    larger CLIP), only the data, steps, batches and precision cut to CPU size: every stage's
    output fits the next (latent channels, cross-attention width, the text tower)."""
    data = ["data.source.size=16", "data.source.resolution=64", "data.transform.resolution=64", "data.eval_size=4"]
    small = ["train.steps=2", "train.batch_size=2", "train.warmup_steps=0", "train.mixed_precision=no"]
    overrides = {
        "clip": [*data, "train.steps=2", "train.batch_size=8", "train.warmup_steps=0", "train.mixed_precision=no",
                 "retrieval_candidates=4"],
        "vae": [*data, *small, "crop_size=0", "train.eval_every=0", "train.save_every=0",
                "loss.disc_start=1"],
        "encode": [*data, "batch_size=4"],
        "ldm": [*small, "train.eval_every=0", "train.save_every=0", "validation.steps=2", "validation.seeds=[0]"],
    }
    summary = run_demo(tmp_path, preset="shapes_gpu", n_eval=2, overrides=overrides)
    assert set(summary["adherence"]) >= {"color", "shape", "size", "position", "background"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "ldm" / "pipeline")
    assert pipe.vae.config.block_out_channels == [64, 128, 256, 256]  # kl-f8: 64 px -> 8x8 latents
    assert list(pipe.unet.config.block_out_channels) == [128, 256, 256]  # the "small" preset
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 256  # the GPU CLIP's text width
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    out = generate(load_pipeline(tmp_path / "ldm" / "pipeline"), ["a small blue star at the top, on a black background"],
                   seeds=[0], steps=2)
    assert out[0]["image"].size == (64, 64)


def test_demo_set_passes_each_override_to_its_stage(monkeypatch, tmp_path):
    """`demo.py --set STAGE:KEY=VALUE` reaches run_demo as that stage's override; a stage that does
    not exist, or no KEY=VALUE, is an error that names the form."""
    import ldm.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, preset, n, overrides=None, heldout=None: calls.append(overrides))
    demo.main(["--out", str(tmp_path), "--set", "ldm:train.steps=2600", "--set", "vae:train.steps=3000",
               "--set", "ldm:train.batch_size=24"])
    assert calls == [{"ldm": ["train.steps=2600", "train.batch_size=24"], "vae": ["train.steps=3000"]}]
    for bad in ("unet:train.steps=5", "train.steps=5", "ldm:train.steps"):
        with pytest.raises(SystemExit):
            demo.main(["--out", str(tmp_path), "--set", bad])
    assert len(calls) == 1
