"""The sampler registry and the denoising loop (ldm.sampling) on a tiny UNet and VAE, CPU, no weights."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from ldm.diffusion import NoiseConfig, scheduler_config
from ldm.models.presets import unet_config, vae_config
from ldm.sampling import (SCHEDULERS, Inpainting, decode_latents, denoise, encode_images, initial_noise,
                          make_scheduler, noise_level, predicted_x0, sampler_objective, scheduler_name_of, seed_sde_noise,
                          seeded_generators, set_steps)

# The training schedules a model can come with (ldm.diffusion is what stage 3 saves).
SCHEDULES = {
    "epsilon": scheduler_config(NoiseConfig()),
    "v_prediction": scheduler_config(NoiseConfig(prediction_type="v_prediction")),
    "v_zero_snr_trailing": scheduler_config(NoiseConfig(prediction_type="v_prediction", zero_terminal_snr=True,
                                                        timestep_spacing="trailing")),
    "flow": scheduler_config(NoiseConfig(objective="flow", shift=3.0)),
}
ZERO_SNR_CAPABLE = {"ddpm", "ddim", "euler", "euler_a", "dpm++2m", "dpm++2m_karras", "dpm++2m_sde", "unipc", "lcm"}
CASES = [(name, schedule) for schedule in SCHEDULES for name in SCHEDULERS
         if (schedule == "flow") == (sampler_objective(name) == "flow")
         and (schedule != "v_zero_snr_trailing" or name in ZERO_SNR_CAPABLE)]
LATENT = (2, 4, 4, 4)  # two 16 px images through the f4 VAE


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("tiny")).eval()
    vae = AutoencoderKL(**vae_config("tiny-f4")).eval()
    cond, uncond = torch.randn(2, 8, 64), torch.randn(2, 8, 64)
    return unet, vae, cond, uncond


def _noise(seeds=(0, 1)):
    generators = seeded_generators(list(seeds))
    return initial_noise(LATENT, generators, "cpu", torch.float32), generators


@pytest.mark.parametrize("name,schedule", CASES)
def test_every_scheduler_gives_finite_images_with_the_models_schedule(models, name, schedule):
    unet, vae, cond, uncond = models
    scheduler = make_scheduler(name, SCHEDULES[schedule])
    seed_sde_noise(scheduler, [0, 1])
    keys = ("num_train_timesteps",) if schedule == "flow" else ("prediction_type", "beta_schedule", "beta_start",
                                                                   "beta_end", "num_train_timesteps")
    for key in keys:
        assert scheduler.config[key] == SCHEDULES[schedule][key], key
    if schedule == "flow":  # the shift, in the class's own word for it
        assert scheduler.config.get("shift", scheduler.config.get("flow_shift")) == 3.0
    if schedule == "v_zero_snr_trailing":
        assert scheduler.config.rescale_betas_zero_snr and scheduler.config.timestep_spacing == "trailing"
    noise, generators = _noise()
    latents = denoise(unet, scheduler, cond, uncond, noise, num_steps=3, guidance_scale=4.0, generator=generators)
    images = decode_latents(vae, latents)
    assert images.shape == (2, 3, 16, 16)
    assert torch.isfinite(latents).all() and torch.isfinite(images).all()
    assert not torch.equal(latents, noise * getattr(scheduler, "init_noise_sigma", 1.0))  # it did step


def test_a_scheduler_that_cannot_sample_zero_terminal_snr_is_refused():
    able = [n for n in SCHEDULERS if n in ZERO_SNR_CAPABLE]
    for name in {n for n in SCHEDULERS if sampler_objective(n) == "diffusion"} - ZERO_SNR_CAPABLE:
        with pytest.raises(ValueError, match=rf"'{re.escape(name)}' cannot sample .*zero-terminal-SNR.*{re.escape(', '.join(able))}"):
            make_scheduler(name, SCHEDULES["v_zero_snr_trailing"])


def test_sampler_settings_come_from_the_name_not_the_saved_scheduler():
    saved = {**SCHEDULES["epsilon"], "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True,
             "algorithm_type": "dpmsolver", "solver_order": 3}
    del saved["clip_sample"]  # as an Euler or DPM-Solver config has none
    assert make_scheduler("euler", saved).config.use_karras_sigmas is False
    assert make_scheduler("dpm++2m_karras", saved).config.use_karras_sigmas is True
    dpm = make_scheduler("dpm++2m", saved).config
    assert (dpm.algorithm_type, dpm.solver_order, dpm.use_karras_sigmas) == ("dpmsolver++", 2, False)
    assert make_scheduler("ddim", saved).config.clip_sample is False  # DDIM's own default clips latents
    with pytest.raises(ValueError, match="unknown scheduler 'k_euler'.*euler_a"):
        make_scheduler("k_euler", saved)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_name_of_names_what_make_scheduler_built(name):
    schedule = SCHEDULES["flow" if sampler_objective(name) == "flow" else "epsilon"]
    assert scheduler_name_of(make_scheduler(name, schedule)) == name


def test_scheduler_name_of_a_sampler_outside_the_registry_is_none():
    from diffusers import EulerDiscreteScheduler

    assert scheduler_name_of(EulerDiscreteScheduler(use_karras_sigmas=True)) is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    scheduler = DDPMScheduler.from_config({**SCHEDULES["epsilon"], "prediction_type": prediction_type})
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    t = torch.tensor([600] * 3)
    x_t = scheduler.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    torch.testing.assert_close(predicted_x0(scheduler, x_t, target, 600), x0, atol=1e-4, rtol=1e-4)


def test_img2img_runs_the_last_strength_of_the_steps_from_the_noised_image(models):
    unet, vae, cond, uncond = models
    image_latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    seen = []
    scheduler = make_scheduler("ddim", SCHEDULES["epsilon"])
    noise, generators = _noise()
    denoise(unet, scheduler, cond, uncond, noise, num_steps=4, guidance_scale=3.0, generator=generators,
            image_latents=image_latents, strength=0.5, callback=lambda i, t, x, x0: seen.append(t))
    assert seen == scheduler.timesteps[2:].tolist()
    with pytest.raises(ValueError, match="strength 0.1 with 4 steps leaves no step"):
        denoise(unet, scheduler, cond, uncond, noise, num_steps=4, image_latents=image_latents, strength=0.1)
    with pytest.raises(ValueError, match="pass image_latents"):
        denoise(unet, scheduler, cond, uncond, noise, num_steps=4, strength=0.5)


def test_blended_inpainting_keeps_the_known_latents_and_regenerates_the_masked_ones(models):
    unet, vae, cond, uncond = models
    image_latents = torch.randn(LATENT, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., :, 2:] = 1  # regenerate the right half
    noise, generators = _noise()
    out = denoise(unet, make_scheduler("euler_a", SCHEDULES["epsilon"]), cond, uncond, noise, num_steps=3,
                  generator=generators, image_latents=image_latents, inpaint=Inpainting(mask))
    assert torch.equal(out[..., :2], image_latents[..., :2])
    assert (out[..., 2:] - image_latents[..., 2:]).abs().mean() > 0.1


def test_encode_images_draws_one_posterior_sample_per_generator(models):
    vae = models[1]
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    both = encode_images(vae, image, seeded_generators([3, 4]))
    alone = encode_images(vae, image, seeded_generators([4]))
    assert both.shape == (2, 4, 4, 4) and not torch.equal(both[0], both[1])
    torch.testing.assert_close(both[1:], alone, atol=1e-6, rtol=0)


def test_sde_noise_follows_the_image_seeds_not_the_global_rng(models):
    unet, _, cond, uncond = models

    def run(seeds):
        scheduler = make_scheduler("dpm++sde", SCHEDULES["epsilon"])
        seed_sde_noise(scheduler, seeds)
        torch.manual_seed(len(run.calls))  # a different global RNG state for every call
        run.calls.append(seeds)
        noise = torch.zeros(LATENT)  # the same start: only the scheduler's own noise differs
        return denoise(unet, scheduler, cond, uncond, noise, num_steps=3, guidance_scale=3.0)

    run.calls = []
    first, again, other = run([0, 1]), run([0, 1]), run([0, 2])
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


@pytest.mark.parametrize("schedule", ["epsilon", "flow"])
def test_noise_level_is_edm_sigma(schedule):
    """x_t / alpha_t = x0 + sigma eps: sqrt((1 - abar) / abar) on the DDPM process, s / (1 - s) on a flow."""
    scheduler = make_scheduler("dpm++2m" if schedule == "epsilon" else "flow-euler", SCHEDULES[schedule])
    if schedule == "flow":
        assert noise_level(scheduler, 250) == pytest.approx(0.25 / 0.75)
        assert noise_level(scheduler, 1000) == float("inf")
    else:
        abar = float(scheduler.alphas_cumprod[600])
        assert noise_level(scheduler, 600) == pytest.approx(((1 - abar) / abar) ** 0.5)
        assert noise_level(scheduler, 999) > 10 > 0.1 > noise_level(scheduler, 0)
        zero_snr = make_scheduler("ddim", SCHEDULES["v_zero_snr_trailing"])
        assert noise_level(zero_snr, 999) == float("inf")


class _CountingUNet(torch.nn.Module):
    """The tiny U-Net, recording the batch size of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, **kwargs):
        self.batches.append(x.shape[0])
        return self.unet(x, t, **kwargs)


@pytest.mark.parametrize("name,schedule", [("dpm++2m", "epsilon"), ("flow-dpm++2m", "flow")])
def test_guidance_interval_guides_only_the_steps_inside_it(models, name, schedule):
    unet, _, cond, uncond = models
    counting = _CountingUNet(unet)

    def run(guidance_scale=4.0, uncond=uncond, **kwargs):
        noise, generators = _noise()
        counting.batches.clear()
        return denoise(counting, make_scheduler(name, SCHEDULES[schedule]), cond, uncond, noise, num_steps=6,
                       guidance_scale=guidance_scale, generator=generators, **kwargs)

    guided = run()
    assert counting.batches == [4] * 6
    torch.testing.assert_close(run(guidance_interval=(0, float("inf"))), guided, atol=0, rtol=0)
    unguided = run(uncond=None)
    torch.testing.assert_close(run(guidance_interval=(1e6, 1e7)), unguided, atol=0, rtol=0)
    assert counting.batches == [2] * 6  # the conditional pass alone
    scheduler = make_scheduler(name, SCHEDULES[schedule])
    scheduler.set_timesteps(6)
    levels = [noise_level(scheduler, t) for t in scheduler.timesteps]
    lo, hi = levels[4], levels[1]  # guided: steps 2, 3 and 4 (lo < sigma <= hi)
    middle = run(guidance_interval=(lo, hi))
    assert counting.batches == [2, 4, 4, 4, 2, 2]
    assert not torch.equal(middle, guided) and not torch.equal(middle, unguided)
    with pytest.raises(ValueError, match="need 0 <= lo < hi"):
        run(guidance_interval=(2.0, 1.0))


def test_composed_prompts_sum_their_parts_scores(models):
    """Liu et al. 2022: u + g * sum_k w_k (e_k - u), against the U-Net called on each part by hand."""
    unet, _, cond, uncond = models
    other = torch.randn(cond.shape, generator=torch.Generator().manual_seed(5))
    weights = torch.tensor([[1.0, 0.5], [0.7, -0.3]])  # (parts, images)
    noise, _ = _noise()
    out = denoise(unet, make_scheduler("ddim", SCHEDULES["epsilon"]), torch.cat([cond, other]), uncond, noise,
                  num_steps=1, guidance_scale=3.0, part_weights=weights)
    scheduler = make_scheduler("ddim", SCHEDULES["epsilon"])
    set_steps(scheduler, 1, "cpu")
    t = scheduler.timesteps[0]
    with torch.no_grad():
        u, a, b = (unet(noise, t, encoder_hidden_states=c).sample for c in (uncond, cond, other))
    composed = u + weights[0].view(-1, 1, 1, 1) * (a - u) + weights[1].view(-1, 1, 1, 1) * (b - u)
    expected = scheduler.step(u + 3.0 * (composed - u), t, noise).prev_sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # one part of weight 1 is plain guidance; a composition needs the unconditional prediction
    plain = denoise(unet, make_scheduler("ddim", SCHEDULES["epsilon"]), cond, uncond, noise, num_steps=2, guidance_scale=3.0)
    one = denoise(unet, make_scheduler("ddim", SCHEDULES["epsilon"]), cond, uncond, noise, num_steps=2, guidance_scale=3.0,
                  part_weights=torch.ones(1, 2))
    torch.testing.assert_close(one, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="composed prompts need the unconditional prediction"):
        denoise(unet, make_scheduler("ddim", SCHEDULES["epsilon"]), torch.cat([cond, other]), None, noise, num_steps=1,
                part_weights=weights)
