"""Class labels, class-conditional U-Nets, the noise-aware classifier and classifier guidance (issue #22)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ldm.config import ConfigError, load_config
from ldm.data.cache import open_cache
from ldm.data.labels import cache_labels, label_indices, null_label, record_names
from ldm.diffusion import NoiseConfig, scheduler_config
from ldm.models.classifier import ClassifierFormatError, load_classifier
from ldm.models.presets import vae_config
from ldm.data.cache import vae_identity
from ldm.sampling import (NOT_CLASSIFIER_GUIDABLE, SCHEDULERS, ClassifierGuidance, classifier_guided, denoise,
                          make_scheduler)
from ldm.train.classifier import ClassifierTrainConfig, train_classifier

from fixtures_runs import latents  # noqa: F401  (the module-scoped tiny cache)

CLASSIFIER = ["model.block_out_channels=[16, 32]", "model.norm_num_groups=8", "train.batch_size=4", "train.steps=3",
              "train.log_every=1", "eval_bins=4", "eval_batches=1"]


# ----------------------------------------------------------------------------- labels


def test_labels_from_shapes_captions_and_folders(latents):
    cache = open_cache(latents["cache"], "train")
    names, labels = cache_labels(cache, "shapes:shape")
    assert names == ["circle", "square", "triangle", "star"]
    assert labels.shape == (len(cache),) and labels.dtype == torch.long
    for i in range(5):  # each label is the shape its caption names
        assert names[labels[i]] in cache.captions[i][0]
    assert record_names("folder", [["a"], ["b"]], ["star/1.png", "circle/x/2.png"]) == ["star", "circle"]
    with pytest.raises(ValueError, match="class subfolders"):
        record_names("folder", [["a"]], ["top.png"])
    with pytest.raises(ValueError, match="not one of"):
        record_names("shapes:texture", [["a"]], ["x"])


def test_unknown_class_name_lists_the_known_ones():
    names = ["circle", "square", "triangle", "star"]
    assert label_indices(names, ["star", "circle"]).tolist() == [3, 0]
    assert null_label(names) == 4
    with pytest.raises(ValueError, match="unknown class 'hexagon'.*circle, square, triangle, star"):
        label_indices(names, ["star", "hexagon"])


# ----------------------------------------------------------------------------- the classifier


@pytest.fixture(scope="module")
def classifier(latents, tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier")
    cfg = load_config(ClassifierTrainConfig, None, [f"out_dir={out}", f"cache={latents['cache']}",
                                                    f"vae={latents['vae']}", *CLASSIFIER])
    return train_classifier(cfg)


def test_classifier_trains_and_writes_accuracy_per_noise_level(classifier, latents):
    run = classifier.parent
    result = json.loads((run / "eval.json").read_text())
    assert [b["bin"] for b in result["bins"]] == [0, 1, 2, 3]
    assert [(b["t_low"], b["t_high"]) for b in result["bins"]][:2] == [(0, 249), (250, 499)]
    assert all(0.0 <= b["accuracy"] <= 1.0 and b["n"] == 4 for b in result["bins"])
    assert (run / "accuracy.png").stat().st_size > 1000
    model, record = load_classifier(classifier, expect_vae=vae_identity(AutoencoderKL.from_pretrained(latents["vae"])))
    assert record["classes"] == ["circle", "square", "triangle", "star"] and record["labels"] == "shapes:shape"
    assert record["noise_schedule"]["num_train_timesteps"] == 1000
    logits = model(torch.randn(2, 4, 4, 4), torch.tensor([10, 900]))
    assert logits.shape == (2, 4)


def test_classifier_from_another_vae_is_refused_naming_both_hashes(classifier, tmp_path):
    torch.manual_seed(1)
    other = AutoencoderKL(**vae_config("tiny-f4", scaling_factor=0.5))
    theirs = json.loads((classifier / "classifier.json").read_text())["vae"]["vae_hash"]
    ours = vae_identity(other)["vae_hash"]
    with pytest.raises(ClassifierFormatError, match=f"(?s)another VAE.*{theirs}.*{ours}"):
        load_classifier(classifier, expect_vae=vae_identity(other))


def test_classifier_config_refuses_bad_labels_and_flow(latents):
    base = [f"cache={latents['cache']}", f"vae={latents['vae']}"]
    with pytest.raises(ConfigError, match="labels"):
        load_config(ClassifierTrainConfig, None, [*base, "labels=shapes:texture"])
    with pytest.raises(ConfigError, match="flow"):
        load_config(ClassifierTrainConfig, None, [*base, "noise.objective=flow"])


# ----------------------------------------------------------------------------- guidance


class LinearClassifier(torch.nn.Module):
    """log p(y | x) = log_softmax(W x): a classifier whose gradient is known in closed form."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(classes, dim))

    def forward(self, x, t):
        return x.flatten(1) @ self.w.T


def _expected_grad(clf, x, labels):
    logits = x.flatten(1) @ clf.w.T
    p = logits.softmax(-1)
    return (clf.w[labels] - p @ clf.w).view_as(x)  # d/dx log softmax(Wx)_y = w_y - E_p[w]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_prediction_matches_the_formula(prediction_type):
    torch.manual_seed(0)
    clf = LinearClassifier(4 * 2 * 2, 3)
    scheduler = make_scheduler("ddim", scheduler_config(NoiseConfig(prediction_type=prediction_type)))
    x, pred, labels, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0, 2]), 500
    guided = classifier_guided(ClassifierGuidance(clf, labels, scale=3.0), scheduler, x, pred, t)
    abar = scheduler.alphas_cumprod[t]
    g = _expected_grad(clf, x, labels).detach()
    if prediction_type == "epsilon":  # Dhariwal & Nichol 2021, eq. 14
        expected = pred - 3.0 * (1 - abar).sqrt() * g
    else:  # through eps: eps = sqrt(abar) v + sqrt(1 - abar) x_t
        eps = abar.sqrt() * pred + (1 - abar).sqrt() * x
        eps_hat = eps - 3.0 * (1 - abar).sqrt() * g
        x0_hat = (x - (1 - abar).sqrt() * eps_hat) / abar.sqrt()
        expected = abar.sqrt() * eps_hat - (1 - abar).sqrt() * x0_hat
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-5)


def _tiny_unet(num_class_embeds=None):
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
                                num_class_embeds=num_class_embeds).eval()


def _sample(unet, scheduler_name="dpm++2m", guidance=None, guidance_scale=1.0, **kw):
    scheduler = make_scheduler(scheduler_name, scheduler_config(NoiseConfig()))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(2, 5, 8)
    return denoise(unet, scheduler, cond, uncond, noise, num_steps=3, guidance_scale=guidance_scale,
                   classifier_guidance=guidance, **kw)


def test_scale_zero_is_bit_identical_and_guidance_moves_samples_with_a_text_model():
    unet, clf = _tiny_unet(), LinearClassifier(4 * 8 * 8, 3)
    plain = _sample(unet, guidance_scale=4.0)  # a text-conditioned model with classifier-free guidance
    zero = _sample(unet, guidance=ClassifierGuidance(clf, torch.tensor([0, 1]), scale=0.0), guidance_scale=4.0)
    assert torch.equal(plain, zero)
    guided = _sample(unet, guidance=ClassifierGuidance(clf, torch.tensor([0, 1]), scale=3.0), guidance_scale=4.0)
    assert not torch.allclose(plain, guided)
    # toward the class asked for: the margin of its logit over the others' mean rises
    small = LinearClassifier(4 * 8 * 8, 3)
    small.w.data *= 0.01  # unsaturated, so the gradient is not ~0
    margin = lambda x: (small(x, None)[:, 0] - small(x, None).mean(-1)).mean()  # noqa: E731
    up = _sample(unet, guidance=ClassifierGuidance(small, torch.tensor([0, 0]), scale=10.0))
    assert margin(up) > margin(_sample(unet)) + 0.1


def test_refused_samplers_are_named():
    unet, clf = _tiny_unet(), LinearClassifier(4 * 8 * 8, 3)
    assert {"kdpm2", "kdpm2_a", "dpm++sde", "flow-lcm", "flow-euler"} <= set(NOT_CLASSIFIER_GUIDABLE)
    with pytest.raises(ValueError, match="cannot run with scheduler 'kdpm2'.*use one of: ddpm, ddim"):
        _sample(unet, "kdpm2", guidance=ClassifierGuidance(clf, torch.tensor([0, 1]), scale=1.0))
    for name in ("ddim", "ddpm", "euler", "heun", "unipc"):  # those that take it run
        assert name in SCHEDULERS and name not in NOT_CLASSIFIER_GUIDABLE
        _sample(unet, name, guidance=ClassifierGuidance(clf, torch.tensor([0, 1]), scale=1.0))
    other = scheduler_config(NoiseConfig(beta_schedule="linear"))
    with pytest.raises(ValueError, match="another noise schedule.*beta_schedule"):
        _sample(unet, guidance=ClassifierGuidance(clf, torch.tensor([0, 1]), scale=1.0, schedule=other))


# ----------------------------------------------------------------------------- class-conditional U-Nets


def test_label_dropout_uses_the_null_class():
    from ldm.train.common import sample_generators
    from ldm.train.ldm import class_labels

    labels = torch.tensor([0, 1, 2, 3] * 50)
    gen = sample_generators(0, 0, 0, 0, len(labels))
    dropped = class_labels(labels, 4, 0.3, gen)
    kept = dropped != 4
    assert torch.equal(dropped[kept], labels[kept])  # a label is kept as it is, or becomes the null class
    assert 0.15 < (~kept).float().mean() < 0.45
    assert torch.equal(class_labels(labels, 4, 0.0, gen), labels)


@pytest.fixture(scope="module")
def class_run(latents, tmp_path_factory):
    from fixtures_runs import ldm_cfg
    from ldm.train.ldm import train_ldm

    out = tmp_path_factory.mktemp("classes")
    return train_ldm(ldm_cfg(out, latents, "labels=shapes:shape", "label_dropout=0.2", "train.steps=2",
                             "train.save_every=0", "validation.quality_n=0",
                             "validation.prompts=[a small red star at the top, on a white background]",
                             "validation.seeds=[0]", "validation.steps=2"))


def test_class_conditional_training_exports_class_names(class_run):
    from ldm.infer import generate, load_pipeline
    from ldm.pipeline import load_pipeline_dir, read_record

    record = read_record(class_run)
    assert record["classes"] == ["circle", "square", "triangle", "star"] and record["labels"] == "shapes:shape"
    sd = load_pipeline_dir(class_run)  # plain diffusers loads it as it is
    assert sd.unet.config.num_class_embeds == 5  # 4 classes + the null class
    assert (class_run.parent / "samples").is_dir()
    pipe = load_pipeline(class_run, device="cpu", dtype="float32")
    out = generate(pipe, ["", ""], class_labels=["star", "circle"], steps=2, guidance_scale=3.0, progress=False)
    assert len(out) == 2 and out[0]["class_labels"] == ["star", "circle"]
    a = generate(pipe, [""], class_labels="star", seeds=[0], steps=2, guidance_scale=3.0, progress=False)[0]["array"]
    b = generate(pipe, [""], class_labels="circle", seeds=[0], steps=2, guidance_scale=3.0, progress=False)[0]["array"]
    assert not (a == b).all()  # the class embedding reaches the U-Net
    with pytest.raises(ValueError, match="unknown class 'hexagon'; this model knows: circle, square, triangle, star"):
        generate(pipe, [""], class_labels=["hexagon"], steps=2, progress=False)


def test_generate_with_classifier_guidance(class_run, classifier, latents):
    """Our classifier on a text model's samples (this run's VAE is the cache's): guided and refused."""
    from ldm.infer import generate, load_pipeline

    pipe = load_pipeline(class_run, device="cpu", dtype="float32")
    kw = dict(seeds=[0], steps=2, guidance_scale=3.0, progress=False, classifier=classifier)
    plain = generate(pipe, ["a small red star"], class_labels="star", classifier_scale=0.0, **kw)[0]["array"]
    guided = generate(pipe, ["a small red star"], class_labels="star", classifier_scale=10.0, **kw)[0]["array"]
    assert not (plain == guided).all()
    with pytest.raises(ValueError, match="cannot run with scheduler 'kdpm2'"):
        generate(pipe, ["x"], class_labels="star", classifier_scale=1.0, scheduler="kdpm2", **kw)
    model, record = load_classifier(classifier)
    other = {**record, "vae": {**record["vae"], "vae_hash": "0123456789abcdef"}}  # as if from another VAE
    with pytest.raises(ClassifierFormatError, match="(?s)another VAE.*0123456789abcdef"):
        generate(pipe, ["x"], class_labels="star", classifier_scale=1.0, **{**kw, "classifier": (model, other)})


def test_stage3_label_settings_are_checked(latents):
    from fixtures_runs import ldm_args
    from ldm.train.ldm import LDMTrainConfig

    with pytest.raises(ConfigError, match="labels 'shapes:texture' is not one of"):
        load_config(LDMTrainConfig, None, ldm_args(latents["cache"].parent / "x", latents, "labels=shapes:texture"))
    with pytest.raises(ConfigError, match="label_dropout"):
        load_config(LDMTrainConfig, None, ldm_args(latents["cache"].parent / "x", latents, "labels=folder",
                                                   "label_dropout=1.0"))
    # a text-unconditional model (the unconditional side of the comparison) is allowed
    assert load_config(LDMTrainConfig, None, ldm_args(latents["cache"].parent / "x", latents,
                                                      "caption_dropout=1.0")).caption_dropout == 1.0


def test_infer_cli_takes_a_class_and_a_classifier(class_run, classifier, tmp_path):
    from ldm.infer import main

    main([str(class_run), "--prompt", "", "--class", "star", "--classifier", str(classifier), "--classifier-scale", "2",
          "--steps", "2", "--device", "cpu", "--out", str(tmp_path)])
    assert (tmp_path / "0000-seed0.png").is_file()
    with pytest.raises(SystemExit, match="unknown class 'hexagon'"):
        main([str(class_run), "--prompt", "", "--class", "hexagon", "--steps", "2", "--device", "cpu",
              "--out", str(tmp_path)])


def test_folder_labels_from_an_encoded_imagefolder(latents, tmp_path):
    """An imagefolder's record ids keep the subfolder, so `folder` labels work on a real cache."""
    from PIL import Image

    from ldm.train.encode import EncodeConfig, encode_dataset

    for k, (name, color) in enumerate([("cat", (200, 30, 30)), ("dog", (30, 30, 200))] * 3):
        (tmp_path / "images" / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), color).save(tmp_path / "images" / name / f"{k}.png")
    cfg = load_config(EncodeConfig, None, [f"vae={latents['vae']}", f"out_dir={tmp_path / 'cache'}",
                                           "data.source.kind=imagefolder", f"data.source.path={tmp_path / 'images'}",
                                           "data.transform.resolution=16", "data.eval_size=0"])
    names, labels = cache_labels(open_cache(encode_dataset(cfg), "train"), "folder")
    assert names == ["cat", "dog"] and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_the_guidance_bench_trains_three_models_and_scores_every_setting(latents, tmp_path):
    """bench/classifier_guidance.py at two steps a model, on a demo-shaped directory of the tiny cache."""
    import os
    import subprocess
    import sys

    from fixtures_runs import REPO, ldm_cfg
    from ldm.config import save_config

    demo = tmp_path / "demo"
    (demo / "vae").mkdir(parents=True)
    (demo / "ldm").mkdir()
    (demo / "latents").symlink_to(latents["cache"])
    (demo / "vae" / "vae").symlink_to(latents["vae"])
    save_config(ldm_cfg(demo / "ldm", latents, "validation.quality_n=0"), demo / "ldm" / "config.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "classifier_guidance.py"), "--demo", str(demo),
                           "--out", str(tmp_path / "cg"), "--text-encoder", "tiny", "--steps", "2", "--classifier-steps", "2",
                           "--batch", "4", "--n", "4", "--sampling-steps", "2", "--scales", "0,3", "--cfg", "1,3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "cg" / "guidance.json").read_text())
    assert [r["setting"] for r in result["rows"]] == [
        "unconditional + classifier guidance s=0", "unconditional + classifier guidance s=3",
        "class-conditional, CFG w=1", "class-conditional, CFG w=3"]
    assert all(0 <= r["shape_accuracy"] <= 1 for r in result["rows"])
    assert len(result["classifier_accuracy"]["bins"]) == 10
    assert (tmp_path / "cg" / "adherence.png").is_file() and (tmp_path / "cg" / "classifier-accuracy.png").is_file()
