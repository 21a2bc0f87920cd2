"""Prompt-adherence helpers (ldm.evaluate): scores split by object size and by background, and the VAE's ceiling."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ldm.data import shapes
from ldm.evaluate import reconstruction_adherence, scores_by_background, scores_by_size
from ldm.models.presets import vae_config


class _Latent:
    def __init__(self, x):
        self.x = x

    def mode(self):
        return self.x


class _Pixels:
    """An 'autoencoder' whose latent is the image itself, optionally blurred on the way back."""

    def __init__(self, blur: int = 1):
        self.blur, self.device, self.dtype = blur, torch.device("cpu"), torch.float32

    def encode(self, x):
        return type("Out", (), {"latent_dist": _Latent(x)})()

    def decode(self, z):
        if self.blur > 1:
            z = F.avg_pool2d(F.pad(z, (self.blur // 2,) * 4, mode="replicate"), self.blur, stride=1)
        return type("Out", (), {"sample": z})()


def test_scores_by_size_splits_small_from_large():
    scenes = shapes.all_single_object_scenes()[:40]
    images = [shapes.render(s, 32) for s in scenes]
    # every small object drawn as the wrong shape: only the small scores drop
    wrong = {"circle": "square", "square": "circle", "triangle": "star", "star": "triangle"}
    for i, scene in enumerate(scenes):
        obj = scene.objects[0]
        if obj.size == "small":
            swapped = shapes.Scene(scene.background, (dataclasses.replace(obj, shape=wrong[obj.shape]),))
            images[i] = shapes.render(swapped, 32)
    result = scores_by_size(images, scenes)
    assert result["large"]["shape"] == 1.0 and result["small"]["shape"] == 0.0
    n_small = sum(s.objects[0].size == "small" for s in scenes)
    assert result["all"]["shape"] == pytest.approx(1 - n_small / len(scenes))
    assert result["small"]["color"] == 1.0


def test_scores_by_background_splits_the_colour_errors_on_black():
    scenes = shapes.all_single_object_scenes()[::7]
    images = [shapes.render(s, 32) for s in scenes]
    # every object on black drawn orange, or yellow where it is orange: only black's colour drops
    for i, scene in enumerate(scenes):
        obj = scene.objects[0]
        if scene.background == "black":
            wrong = dataclasses.replace(obj, color="yellow" if obj.color == "orange" else "orange")
            images[i] = shapes.render(shapes.Scene("black", (wrong,)), 32)
    result = scores_by_background(images, scenes)
    assert set(result) == {"white", "black", "gray"}
    assert result["black"]["color"] == 0.0 and result["black"]["shape"] == 1.0
    assert result["white"]["color"] == 1.0 and result["gray"]["color"] == 1.0


def test_reconstruction_ceiling_is_perfect_for_a_lossless_vae_and_drops_with_blur():
    perfect = reconstruction_adherence(_Pixels(), 32)
    assert all(perfect[part][key] == 1.0 for part in ("all", "small", "large") for key in ("color", "shape", "position"))
    blurred = reconstruction_adherence(_Pixels(blur=5), 32)
    assert blurred["small"]["shape"] < 0.9 and blurred["small"]["shape"] < blurred["large"]["shape"]


def test_reconstruction_ceiling_of_chosen_combinations():
    """`only`: the ceiling of the held-out combinations alone; a codec that turns green to red
    fails green scenes and nothing else."""
    class GreenToRed(_Pixels):
        def decode(self, z):
            green = torch.tensor(shapes.COLORS["green"]).view(1, 3, 1, 1) / 127.5 - 1
            red = torch.tensor(shapes.COLORS["red"]).view(1, 3, 1, 1) / 127.5 - 1
            is_green = ((z - green).abs() < 0.05).all(dim=1, keepdim=True)
            return type("Out", (), {"sample": torch.where(is_green, red, z)})()

    green = reconstruction_adherence(GreenToRed(), 32, only=[{"color": "green", "background": "black"}])
    assert green["all"]["color"] == 0.0 and green["all"]["position"] == 1.0
    red = reconstruction_adherence(GreenToRed(), 32, only=[{"color": "red"}])
    assert red["all"]["all"] == 1.0


def test_reconstruction_ceiling_runs_on_an_autoencoderkl():
    torch.manual_seed(0)
    vae = AutoencoderKL(**vae_config("tiny-f4", sample_size=32)).eval()
    result = reconstruction_adherence(vae, 32, batch_size=128)
    assert set(result) == {"all", "small", "large"}
    assert all(0.0 <= v <= 1.0 for part in result.values() for v in part.values())
