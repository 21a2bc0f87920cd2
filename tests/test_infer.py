"""Inference (ldm.infer): against diffusers' own pipelines, seeds, files, img2img, inpainting, the CLI.

Tiny pipelines saved into a temporary directory; CPU, float32, nothing downloaded.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKL, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.diffusion import NoiseConfig, scheduler_config
from ldm.infer import (BATCH_SETTINGS, PNG_KEYS, build_parser, generate, group_batches, load_pipeline, main,
                       plan_images, prompt_parts, read_prompts, save_trajectory, save_with_metadata)
from ldm.models.presets import unet_config, vae_config
from ldm.models.text import TEXT_PRESETS, build_tokenizer
from ldm.sampling import SCHEDULERS, decode_latents, encode_images, make_scheduler, seed_sde_noise, seeded_generators

PROMPTS = ["a red circle on the left", "a small blue square"]
NEGATIVES = ["", "green"]
SEEDS = [3, 7]
SIZE = 32  # the tiny UNet's 8x8 latents through the f4 VAE: the pipelines' native size


def _save_tiny_pipeline(path, unet_in_channels: int = 4):
    torch.manual_seed(0)
    StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config("tiny-f4")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT_PRESETS["tiny"])),
        tokenizer=build_tokenizer(),
        unet=UNet2DConditionModel(**unet_config("tiny", in_channels=unet_in_channels)),
        scheduler=make_scheduler("ddim", scheduler_config(NoiseConfig())),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return _save_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return load_pipeline(pipeline_dir)


@pytest.fixture(scope="module")
def reference(pipe):
    """diffusers' StableDiffusionPipeline over the very same modules."""
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                 scheduler=make_scheduler("ddim", pipe.base_scheduler_config), safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    return sd


@pytest.fixture(scope="module")
def photo():
    """A 32x32 RGB image, and a mask that regenerates its central 16x16 square."""
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    return Image.fromarray(pixels), mask


def _arrays(results) -> np.ndarray:
    return np.stack([r["array"] for r in results])


def _reference_scheduler(pipe, name: str, seeds):
    scheduler = make_scheduler(name, pipe.base_scheduler_config)
    seed_sde_noise(scheduler, seeds)
    return scheduler


# --------------------------------------------------------------------------- same images as diffusers


@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpm++2m_karras", "dpm++sde", "ddpm"])
def test_text_to_image_matches_diffusers(pipe, reference, name):
    ours = generate(pipe, PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, scheduler=name, steps=3,
                    guidance_scale=5.0, guidance_rescale=0.7)
    reference.scheduler = _reference_scheduler(pipe, name, SEEDS)
    theirs = reference(PROMPTS, negative_prompt=NEGATIVES, generator=seeded_generators(SEEDS), num_inference_steps=3,
                       guidance_scale=5.0, guidance_rescale=0.7, output_type="np").images
    assert ours[0]["image"].size == (SIZE, SIZE)
    assert np.abs(_arrays(ours) - theirs).max() <= 1e-5


@pytest.mark.parametrize("name", ["euler_a", "dpm++2m"])
def test_img2img_matches_diffusers(pipe, reference, photo, name):
    ours = generate(pipe, PROMPTS, seeds=SEEDS, scheduler=name, steps=4, guidance_scale=5.0, init_image=photo[0],
                    strength=0.6)
    img2img = StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = _reference_scheduler(pipe, name, SEEDS)
    theirs = img2img(PROMPTS, image=photo[0], strength=0.6, generator=seeded_generators(SEEDS), num_inference_steps=4,
                     guidance_scale=5.0, output_type="np").images
    assert np.abs(_arrays(ours) - theirs).max() <= 1e-5


def test_inpainting_matches_diffusers_for_both_kinds_of_unet(pipe, reference, photo, tmp_path):
    """Blended sampling for a plain UNet; a 9-channel inpainting UNet conditioned on mask and masked image."""
    inpainting_unet = load_pipeline(_save_tiny_pipeline(tmp_path, unet_in_channels=9))
    assert inpainting_unet.inpainting_unet and not pipe.inpainting_unet
    for ours_pipe, name, strength in ((pipe, "ddim", 1.0), (pipe, "ddim", 0.7), (inpainting_unet, "euler_a", 0.7)):
        ours = generate(ours_pipe, PROMPTS[:1], seeds=[5], scheduler=name, steps=4, guidance_scale=5.0,
                        init_image=photo[0], mask_image=photo[1], strength=strength)
        inpaint = StableDiffusionInpaintPipeline(vae=ours_pipe.vae, text_encoder=ours_pipe.text_encoder,
                                                 tokenizer=ours_pipe.tokenizer, unet=ours_pipe.unet,
                                                 scheduler=make_scheduler(name, ours_pipe.base_scheduler_config),
                                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        inpaint.set_progress_bar_config(disable=True)
        theirs = inpaint(PROMPTS[:1], image=photo[0], mask_image=photo[1], strength=strength,
                         generator=seeded_generators([5]), num_inference_steps=4, guidance_scale=5.0,
                         output_type="np").images
        assert np.abs(_arrays(ours) - theirs).max() <= 1e-5, (name, strength)


# --------------------------------------------------------------------------- seeds


def test_same_seed_same_image_whatever_the_batch(pipe):
    kwargs = dict(scheduler="euler_a", steps=3, guidance_scale=4.0)
    batch = _arrays(generate(pipe, PROMPTS, seeds=SEEDS, **kwargs))
    again = _arrays(generate(pipe, PROMPTS, seeds=SEEDS, **kwargs))
    alone = _arrays(generate(pipe, PROMPTS[1:], seeds=SEEDS[1:], **kwargs))
    other = _arrays(generate(pipe, PROMPTS[1:], seeds=[8], **kwargs))
    assert np.array_equal(batch, again)
    assert np.abs(batch[1] - alone[0]).max() <= 1e-5  # its own generator: batch-mates change nothing
    assert np.abs(alone - other).mean() > 1e-3


def test_default_size_follows_a_non_square_sample_size(pipeline_dir):
    """Bucketed training stores sample_size as [h, w]: generate() without a size makes h x w images."""
    wide = load_pipeline(pipeline_dir)
    wide.unet.register_to_config(sample_size=[4, 8])  # latents 4 high, 8 wide: 16 x 32 px through the f4 VAE
    result = generate(wide, PROMPTS[:1], seeds=[0], scheduler="ddim", steps=2, guidance_scale=1.0)[0]
    assert result["image"].size == (32, 16) and (result["width"], result["height"]) == (32, 16)
    assert wide.native_height_width == (16, 32) and wide.native_size == 32


# --------------------------------------------------------------------------- img2img and inpainting


def test_img2img_keeps_the_size_and_less_strength_changes_less(pipe):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8))  # 40 wide, 24 high
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    unchanged = decode_latents(pipe.vae, encode_images(pipe.vae, x, seeded_generators([0]))).permute(0, 2, 3, 1).numpy()
    change = {}
    for strength in (0.25, 1.0):
        result = generate(pipe, PROMPTS[:1], seeds=[0], scheduler="ddim", steps=4, guidance_scale=3.0, init_image=image,
                          strength=strength)[0]
        assert result["image"].size == (40, 24) and (result["width"], result["height"]) == (40, 24)
        change[strength] = np.abs(result["array"] - unchanged[0]).mean()
    assert change[0.25] < 0.5 * change[1.0], change


def test_inpainting_changes_the_masked_region_and_keeps_the_rest(pipe, photo):
    """Pixel for pixel with keep_unmasked. (Without it the known region goes through the VAE: its
    latents stay the image's exactly, see test_sampling; a random tiny VAE's decoder, whose group norms
    see the whole image, then moves every pixel, so pixels would measure the VAE, not the sampler.)"""
    image, mask = photo
    inside = np.asarray(mask) > 127
    result = generate(pipe, PROMPTS[:1], seeds=[0], scheduler="dpm++2m", steps=4, guidance_scale=3.0, init_image=image,
                      mask_image=mask, keep_unmasked=True)[0]
    assert np.array_equal(np.asarray(result["image"])[~inside], np.asarray(image)[~inside])
    source = np.asarray(image, dtype=np.float32) / 255
    assert np.abs(result["array"] - source)[inside].mean() > 0.05


# --------------------------------------------------------------------------- files


def test_png_text_chunks_and_trajectory_files(pipe, tmp_path):
    result = generate(pipe, PROMPTS[:1], negative_prompts=["blurry"], seeds=[11], scheduler="heun", steps=3,
                      guidance_scale=6.5, trajectory_every=1)[0]
    save_with_metadata(result, tmp_path / "a.png")
    text = Image.open(tmp_path / "a.png").text
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance_scale")} == {
        "prompt": PROMPTS[0], "negative_prompt": "blurry", "seed": "11", "scheduler": "heun", "steps": "3",
        "guidance_scale": "6.5"}
    assert set(text) >= {k for k in PNG_KEYS if result[k] is not None} and "Seed: 11" in text["parameters"]
    frames = len(result["trajectory"])
    assert frames == 4  # Heun's 3 steps are 5 model calls; the last one's x_t is the image itself
    strip, gif = save_trajectory(result, tmp_path / "a")
    assert Image.open(strip).size[0] > (frames + 1) * SIZE and Image.open(gif).n_frames == frames + 1


def test_load_pipeline_reads_run_dirs_and_single_files_alike(pipeline_dir, pipe, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pipeline_dir, run / "pipeline")
    record = {"clip_skip": 1, "training_scheduler": scheduler_config(NoiseConfig(prediction_type="v_prediction"))}
    (run / "pipeline" / "ldm.json").write_text(json.dumps(record))
    main([str(run), "--export-single-file", str(tmp_path / "model.safetensors")])
    from_dir, from_file = load_pipeline(run), load_pipeline(tmp_path / "model.safetensors")
    for loaded in (from_dir, from_file):
        assert loaded.clip_skip == 1 and loaded.default_scheduler == "ddim"
        assert loaded.base_scheduler_config["prediction_type"] == "v_prediction"
    kwargs = dict(seeds=[2], scheduler="euler", steps=2)
    assert np.array_equal(_arrays(generate(from_dir, PROMPTS[:1], **kwargs)),
                          _arrays(generate(from_file, PROMPTS[:1], **kwargs)))
    with pytest.raises(ImportError, match="needs xformers"):
        load_pipeline(pipeline_dir, attention="xformers")


# --------------------------------------------------------------------------- command line


def test_cli_text_and_jsonl_prompt_files_end_to_end(pipeline_dir, tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    main([str(pipeline_dir), "--prompts", str(txt), "--steps", "2", "--seed", "10", "--scheduler", "euler_a",
          "--trajectory", "1", "--out", str(tmp_path / "txt")])
    names = sorted(p.name for p in (tmp_path / "txt").iterdir())
    assert names == ["0000-seed10-trajectory.gif", "0000-seed10-trajectory.png", "0000-seed10.png",
                     "0001-seed11-trajectory.gif", "0001-seed11-trajectory.png", "0001-seed11.png", "grid.png"]
    assert Image.open(tmp_path / "txt" / "0001-seed11.png").text["prompt"] == PROMPTS[1]

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": PROMPTS[0], "seed": 42, "num_images": 2, "negative_prompt": "dark"},
        {"prompt": PROMPTS[1], "steps": 3, "scheduler": "dpm++2m", "guidance_scale": 2.0},
    ]))
    main([str(pipeline_dir), "--prompts", str(jsonl), "--steps", "2", "--out", str(tmp_path / "jsonl")])
    texts = [Image.open(tmp_path / "jsonl" / name).text for name in ("0000-seed42.png", "0001-seed43.png", "0002-seed2.png")]
    assert [(t["seed"], t["steps"], t["scheduler"]) for t in texts] == [("42", "2", "ddim"), ("43", "2", "ddim"),
                                                                        ("2", "3", "dpm++2m")]
    assert texts[0]["negative_prompt"] == "dark" and texts[2]["guidance_scale"] == "2.0"
    assert (tmp_path / "jsonl" / "grid.png").is_file()


def test_cli_batches_the_images_that_share_settings(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "a", "num_images": 2}, {"prompt": "b", "steps": 9}, {"prompt": "c", "negative_prompt": "x"}]))
    args = build_parser().parse_args(["model", "--prompts", str(jsonl), "--prompt", "z", "--seed", "5"])
    jobs = plan_images(read_prompts(args.prompt, args.prompts), args)
    assert [(j["prompt"], j["seed"]) for j in jobs] == [("z", 5), ("a", 6), ("a", 7), ("b", 8), ("c", 9)]
    groups = group_batches(jobs)
    assert [[j["prompt"] for j in group] for group in groups] == [["z", "a", "a", "c"], ["b"]]
    assert all(len({tuple(j[k] for k in BATCH_SETTINGS) for j in group}) == 1 for group in groups)


def test_cli_rejects_unknown_jsonl_keys_and_lists_schedulers(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "cfg": 3}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: unknown key\(s\) \['cfg'\]"):
        read_prompts(None, str(bad))
    main(["--list-schedulers"])
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(SCHEDULERS)


def test_prompt_parts_read_the_and_syntax():
    assert prompt_parts("a clock: noon") == [("a clock: noon", 1.0)]  # no AND: taken verbatim
    assert prompt_parts("a green square AND on a black background :0.8") == [("a green square", 1.0),
                                                                            ("on a black background", 0.8)]
    assert prompt_parts("x:2 AND  y AND z : -1.5") == [("x", 2.0), ("y", 1.0), ("z", -1.5)]
    with pytest.raises(ValueError, match="empty part"):
        prompt_parts("x AND :2")


def test_composed_prompts_weigh_their_parts_and_batch_with_plain_ones(pipe):
    def images(prompts):
        return _arrays(generate(pipe, prompts, seeds=[3] * len(prompts), steps=3, guidance_scale=4.0, progress=False))

    plain = images(["a red circle"])
    np.testing.assert_allclose(images(["a red circle AND a blue square :0"]), plain, atol=1e-5)
    both = images(["a red circle AND a blue square"])
    assert np.abs(both - plain).max() > 1e-3
    # in one batch, the plain prompt is padded with a part of weight 0: each image is what it is alone
    mixed = images(["a red circle", "a red circle AND a blue square"])
    np.testing.assert_allclose(mixed, np.concatenate([plain, both]), atol=1e-5)
