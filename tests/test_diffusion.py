"""The training-time diffusion process (ldm.diffusion), checked against the formulas by hand:
the three beta schedules, x_t and the v target, min-SNR weights, zero terminal SNR, noise
offset, and reading a pretrained pipeline's scheduler into the noise config."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.config import ConfigError, validate
from ldm.diffusion import (NoiseConfig, TrainNoiseConfig, fill_schedule, make_train_scheduler, noised_inputs,
                           sample_noise, schedule_of, scheduler_config)

T = 1000


def hand_alpha_bar(cfg: NoiseConfig) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), the betas written out per schedule."""
    t = torch.arange(T, dtype=torch.float64)
    if cfg.beta_schedule == "linear":  # Ho et al. 2020
        betas = cfg.beta_start + (cfg.beta_end - cfg.beta_start) * t / (T - 1)
    elif cfg.beta_schedule == "scaled_linear":  # LDM / SD: linear in sqrt(beta)
        betas = (math.sqrt(cfg.beta_start) + (math.sqrt(cfg.beta_end) - math.sqrt(cfg.beta_start)) * t / (T - 1)) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        f = lambda s: torch.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.clamp(1 - f(t + 1) / f(t), max=0.999)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_match_their_formulas(schedule):
    cfg = NoiseConfig(beta_schedule=schedule, beta_start=1e-4, beta_end=0.02)
    abar = make_train_scheduler(cfg).alphas_cumprod.double()
    assert torch.allclose(abar, hand_alpha_bar(cfg), rtol=1e-4, atol=1e-6)
    assert abar[-1] > 0  # no rescaling: SNR(T) > 0


def draws(seed: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps noised_inputs draws from a generator seeded `seed` (noise first)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(latents.shape, generator=g), torch.randint(0, T, (latents.shape[0],), generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_input_and_target_by_hand(prediction_type):
    cfg = NoiseConfig(prediction_type=prediction_type)
    scheduler = make_train_scheduler(cfg)
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noisy, t, target, weights = noised_inputs(scheduler, cfg, x0, torch.Generator().manual_seed(7))
    eps, t_hand = draws(7, x0)
    assert torch.equal(t, t_hand) and weights is None
    a = hand_alpha_bar(cfg)[t].float()[:, None, None, None]
    assert torch.allclose(noisy, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4)
    want = a.sqrt() * eps - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else eps
    assert torch.allclose(target, want, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    """Hang et al. 2023: min(SNR, gamma) / SNR for an epsilon target, min(SNR, gamma) / (SNR + 1) for v."""
    gamma = 5.0
    cfg = NoiseConfig(prediction_type=prediction_type, snr_gamma=gamma)
    x0 = torch.zeros(256, 4, 2, 2)
    _, t, _, weights = noised_inputs(make_train_scheduler(cfg), cfg, x0, torch.Generator().manual_seed(0))
    a = hand_alpha_bar(cfg)[t]
    snr = a / (1 - a)
    want = torch.clamp(snr, max=gamma) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(weights.double(), want, rtol=1e-4)
    low = snr > gamma  # low-noise steps are down-weighted, high-noise steps keep weight 1 (eps) / SNR/(SNR+1) (v)
    assert low.any() and (~low).any()
    assert torch.all(weights[low] < 1)
    if prediction_type == "epsilon":
        assert torch.allclose(weights[~low], torch.ones_like(weights[~low]))


def test_zero_terminal_snr_reaches_alpha_bar_zero_and_weights_the_last_step():
    cfg = NoiseConfig(prediction_type="v_prediction", zero_terminal_snr=True, timestep_spacing="trailing", snr_gamma=5.0)
    scheduler = make_train_scheduler(cfg)
    assert scheduler.alphas_cumprod[-1] == 0 and scheduler.alphas_cumprod[-2] > 0  # Lin et al. 2024, alg. 1
    plain = make_train_scheduler(NoiseConfig())
    assert scheduler.alphas_cumprod[0] == pytest.approx(plain.alphas_cumprod[0].item())  # the first step kept
    x0 = torch.randn(2000, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    noisy, t, target, weights = noised_inputs(scheduler, cfg, x0, torch.Generator().manual_seed(3))
    last = t == T - 1
    assert last.any()
    assert torch.allclose(target[last], -x0[last], atol=1e-6)  # v at SNR 0 is -x0
    assert torch.all(weights[last] == 1)  # not min(0, gamma) / 1 = 0: the step the rescaling exists for


@pytest.mark.parametrize("overrides, message", [
    ({"prediction_type": "epsilon", "timestep_spacing": "trailing"}, "needs noise.prediction_type=v_prediction"),
    ({"prediction_type": "v_prediction", "timestep_spacing": "leading"}, "needs noise.timestep_spacing=trailing"),
])
def test_zero_terminal_snr_refuses_epsilon_and_leading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(NoiseConfig(zero_terminal_snr=True, **overrides))


def test_noise_offset_shifts_per_channel_means():
    """Guttenberg 2023: plain noise's per-(image, channel) mean has std 1/sqrt(HW); the offset adds
    an N(0, offset^2) constant to it, the same for every pixel of the channel."""
    shape = torch.zeros(512, 4, 8, 8)
    plain = sample_noise(shape, 0.0, torch.Generator().manual_seed(0)).mean(dim=(2, 3))
    offset = sample_noise(shape, 0.5, torch.Generator().manual_seed(0)).mean(dim=(2, 3))
    assert plain.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert offset.std().item() == pytest.approx(math.sqrt(0.25 + 1 / 64), rel=0.1)
    assert offset.shape == (512, 4)


# A Stable Diffusion 1.5 and 2.1-v scheduler_config.json, as published (PNDM and DDIM).
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
SD21V = {"_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
         "steps_offset": 1, "trained_betas": None}


def test_a_pretrained_scheduler_fills_only_the_unset_keys():
    cfg = TrainNoiseConfig(beta_end=0.02)
    taken = fill_schedule(cfg, schedule_of(SD21V, "sd21"))
    assert cfg.prediction_type == "v_prediction" and taken["prediction_type"] == "pretrained"
    assert cfg.beta_end == 0.02 and "beta_end" not in taken  # set in the config: kept
    assert cfg.timestep_spacing == "leading" and taken["timestep_spacing"] == "default"  # SD-2.1's config lacks it
    validate(cfg)
    plain = TrainNoiseConfig()
    fill_schedule(plain, schedule_of(SD15, "sd15"))
    assert scheduler_config(plain) == scheduler_config(NoiseConfig())  # SD 1.5's schedule is our default


def test_schedule_of_inverts_scheduler_config():
    cfg = NoiseConfig(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2", zero_terminal_snr=True,
                      timestep_spacing="trailing", num_train_timesteps=500)
    filled = TrainNoiseConfig()
    fill_schedule(filled, schedule_of(scheduler_config(cfg), "ours"))
    assert scheduler_config(filled) == scheduler_config(cfg)


@pytest.mark.parametrize("change, message", [
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
    ({"prediction_type": "sample"}, "prediction_type='sample'"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
])
def test_a_scheduler_stage_3_cannot_train_is_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message):
        schedule_of({**SD15, **change}, "some/pipeline")
