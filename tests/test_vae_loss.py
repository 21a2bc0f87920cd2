"""The KL-VAE objective term by term: each test fails if its term is detached, mis-weighted or
mis-signed. Everything runs on the objects the trainer uses (VAELoss, Autoencode, make_optimizer)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from ldm.config import ConfigError, validate
from ldm.losses import VAELoss, VAELossConfig, gradient_difference, load_lpips
from ldm.models.presets import vae_config
from ldm.train.common import LoopConfig, make_optimizer
from ldm.train.vae import Autoencode


def small_loss(**overrides) -> VAELoss:
    torch.manual_seed(1)
    return VAELoss(VAELossConfig(disc_channels=8, disc_layers=2, **overrides))


@pytest.fixture
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**vae_config("tiny-f4", sample_size=16))


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, 3, 16, 16) * 2 - 1


def forward(vae, loss_fn, x):
    """What the trainer does per micro-batch: Autoencode (which holds logvar) on the images."""
    torch.manual_seed(3)
    return Autoencode(vae, loss_fn.logvar)(x)


def grad_of(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, param, retain_graph=True)[0]


# ----------------------------------------------------------------------------- NLL and KL


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_nll_is_rec_over_exp_logvar_plus_logvar_summed_per_image(vae, x, reconstruction):
    loss_fn = small_loss(reconstruction=reconstruction, logvar_init=0.7, kl_weight=0.0)
    posterior, recon = forward(vae, loss_fn, x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0)
    rec = (x - recon).abs() if reconstruction == "l1" else (x - recon) ** 2
    s = 0.7
    expected = (rec / torch.exp(torch.tensor(s)) + s).sum() / x.shape[0]
    torch.testing.assert_close(loss, expected)
    # dNLL/ds = sum(1 - rec / exp(s)) per image: the log-variance is a live parameter
    torch.testing.assert_close(grad_of(loss, loss_fn.logvar), (1 - rec / torch.exp(torch.tensor(s))).sum() / x.shape[0])


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_gradient_term_adds_the_finite_difference_error_to_every_pixel(vae, x, reconstruction):
    weight = 3.0
    loss_fn = small_loss(reconstruction=reconstruction, gradient_weight=weight, logvar_init=0.0, kl_weight=0.0)
    posterior, recon = forward(vae, loss_fn, x)
    d = x - recon
    dx = torch.zeros_like(d)
    dy = torch.zeros_like(d)
    dx[..., :, :-1] = d[..., :, 1:] - d[..., :, :-1]
    dy[..., :-1, :] = d[..., 1:, :] - d[..., :-1, :]
    power = (lambda t: t.abs()) if reconstruction == "l1" else (lambda t: t**2)
    expected = power(d) + weight * (power(dx) + power(dy))
    torch.testing.assert_close(loss_fn.pixel_loss(x, recon), expected)
    loss, _ = loss_fn.generator_loss(x, recon, posterior, step=0)
    torch.testing.assert_close(loss, expected.sum() / x.shape[0])  # inside the NLL, with gradient
    assert grad_of(loss, recon).abs().sum() > 0


def test_gradient_term_charges_softened_edges_not_flat_errors():
    """Two reconstructions of a square with the same L2 error: one blurred, one uniformly off.
    L2 cannot tell them apart; the gradient term charges only the softened edges."""
    square = torch.full((1, 1, 16, 16), -1.0)
    square[..., 4:12, 4:12] = 1.0
    blurred = F.avg_pool2d(F.pad(square, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    offset = square + ((square - blurred) ** 2).mean().sqrt()
    torch.testing.assert_close(((square - blurred) ** 2).mean(), ((square - offset) ** 2).mean())
    for kind in ("l1", "l2"):
        assert gradient_difference(square, offset, kind).abs().max() < 1e-6
        assert gradient_difference(square, blurred, kind).sum() > 1.0


def test_logvar_is_fixed_when_not_learned(vae, x):
    loss_fn = small_loss(learn_logvar=False, logvar_init=0.5)
    assert not loss_fn.logvar.requires_grad
    posterior, recon = forward(vae, loss_fn, x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0)
    rec = (x - recon).abs()
    assert logs["logvar"] == 0.5
    torch.testing.assert_close(loss_fn.nll(rec), (rec / torch.exp(torch.tensor(0.5)) + 0.5).sum() / 2)


def test_loss_derivative_wrt_kl_weight_is_the_kl(vae, x):
    loss_fn = small_loss()
    kl_weight = torch.tensor(1e-6, requires_grad=True)
    loss_fn.cfg = dataclasses.replace(loss_fn.cfg, kl_weight=kl_weight)
    posterior, recon = forward(vae, loss_fn, x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0)
    # KL(N(mu, sigma^2) || N(0, 1)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2), per image
    mu, logvar = posterior.mean, posterior.logvar
    kl_by_hand = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum() / x.shape[0]
    torch.testing.assert_close(grad_of(loss, kl_weight), kl_by_hand)
    assert logs["kl"] == pytest.approx(kl_by_hand.item(), rel=1e-5)


# ----------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def vgg_state() -> dict[str, torch.Tensor]:
    """A random torchvision vgg16 state dict (its `features` part, all LPIPS reads)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(4)
    features = make_layers(cfgs["D"])
    return {f"features.{k}": v for k, v in features.state_dict().items()}


@pytest.fixture(scope="module")
def vgg_file(vgg_state, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vgg") / "vgg16.safetensors"
    save_file(vgg_state, path)
    return str(path)


@pytest.fixture(scope="module")
def loss_with_lpips(vgg_file) -> VAELoss:
    return small_loss(perceptual_weight=0.5, lpips_vgg_path=vgg_file, kl_weight=0.0)


def _assert_backbone_equals(model, vgg_state):
    own = model.net.state_dict()
    assert len(own) == 26  # 13 convolutions, weight and bias
    for name, value in own.items():
        torch.testing.assert_close(value, vgg_state[f"features.{name.split('.', 1)[1]}"], rtol=0, atol=0)


def test_load_lpips_loads_the_vgg_backbone_from_safetensors(loss_with_lpips, vgg_state):
    model = loss_with_lpips.perceptual  # VAELoss built it with load_lpips(loss.lpips_vgg_path)
    _assert_backbone_equals(model, vgg_state)
    assert not any(p.requires_grad for p in model.parameters())  # a frozen critic


def test_load_lpips_loads_a_torchvision_pth(vgg_state, tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg_state, path)
    _assert_backbone_equals(load_lpips(path), vgg_state)


def test_load_lpips_missing_file_names_the_path_and_the_switch(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_lpips(missing)
    assert str(missing) in str(err.value) and "loss.perceptual_weight=0" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate(VAELossConfig(perceptual_weight=1.0, lpips_vgg_path=str(missing)))
    assert str(missing) in str(err.value) and "loss.perceptual_weight=0" in str(err.value)


def test_load_lpips_rejects_a_state_dict_without_vgg_features(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"classifier.0.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r"features\.0\.weight"):
        load_lpips(path)


def test_perceptual_gradient_reaches_the_decoder(vae, x, loss_with_lpips):
    weight, with_lpips = 0.5, loss_with_lpips
    without = small_loss(kl_weight=0.0)
    posterior, recon = forward(vae, with_lpips, x)
    last_layer = vae.decoder.conv_out.weight
    loss_p, _ = with_lpips.generator_loss(x, recon, posterior, step=0)
    loss_0, _ = without.generator_loss(x, recon, posterior, step=0)
    # the perceptual distance is added to every pixel (LDM), so the NLL grows by w * C*H*W * mean_b(p_b)
    distance = with_lpips.perceptual(x, recon).flatten()
    extra = weight * x[0].numel() * distance.mean()
    torch.testing.assert_close(loss_p - loss_0, extra)
    grad_extra = grad_of(loss_p, last_layer) - grad_of(loss_0, last_layer)
    assert grad_extra.abs().sum() > 0, "the perceptual term sends no gradient to the decoder"
    expected = grad_of(extra, last_layer)  # (a difference of two gradients: float32 cancellation)
    torch.testing.assert_close(grad_extra, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())


# ----------------------------------------------------------------------------- GAN


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_step_pushes_real_logits_up_and_fake_down(vae, x, kind):
    loss_fn = small_loss(disc_loss=kind)
    _, recon = forward(vae, loss_fn, x)
    opt_d = make_optimizer(loss_fn.discriminator.parameters(), LoopConfig(lr=1e-3))
    _, before = loss_fn.discriminator_loss(x, recon)
    for _ in range(3):
        d_loss, _ = loss_fn.discriminator_loss(x, recon)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
    _, after = loss_fn.discriminator_loss(x, recon)
    assert after["logits_real"] > before["logits_real"]
    assert after["logits_fake"] < before["logits_fake"]
    assert after["d_loss"] < before["d_loss"]


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_generator_adversarial_loss_rewards_fooling_the_discriminator(vae, x, kind):
    loss_fn = small_loss(disc_loss=kind, disc_start=0, adaptive_disc_weight=False, disc_weight=1.0, kl_weight=0.0)
    posterior, recon = forward(vae, loss_fn, x)
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0)
    logits = loss_fn.discriminator(recon)
    g_loss = -logits.mean() if kind == "hinge" else F.softplus(-logits).mean()
    assert logs["g_loss"] == pytest.approx(g_loss.item(), rel=1e-5)
    nll = loss_fn.nll(loss_fn.pixel_loss(x, recon))  # ~1e3: compare the difference at its scale
    torch.testing.assert_close(loss - nll, g_loss, rtol=0, atol=1e-6 * nll.item())
    # a step of the reconstruction against the loss's gradient raises the discriminator's score
    step = -1e-2 * torch.autograd.grad(loss, recon)[0].sign()
    assert loss_fn.discriminator(recon + step).mean() > logits.mean()


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer(vae, x):
    loss_fn = small_loss(disc_start=0, disc_weight=0.5)
    posterior, recon = forward(vae, loss_fn, x)
    last_layer = vae.decoder.conv_out.weight
    loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0, last_layer=last_layer)
    # by hand (VQGAN eq. 7): |grad nll| / (|grad g_loss| + 1e-4), times disc_weight
    nll = ((x - recon).abs() / torch.exp(loss_fn.logvar) + loss_fn.logvar).sum() / x.shape[0]
    g_loss = -loss_fn.discriminator(recon).mean()
    nll_grad, g_grad = grad_of(nll, last_layer), grad_of(g_loss, last_layer)
    by_hand = (nll_grad.norm() / (g_grad.norm() + 1e-4)).item() * 0.5
    assert logs["d_weight"] == pytest.approx(by_hand, rel=1e-5)
    kl_part = loss_fn.cfg.kl_weight * posterior.kl().sum() / x.shape[0]
    torch.testing.assert_close(loss, nll + kl_part + logs["d_weight"] * g_loss)
    # the weight is a constant to the optimiser: the total gradient has no d(weight)/d(theta) term
    # (and the KL does not depend on the decoder)
    expected = nll_grad + logs["d_weight"] * g_grad
    torch.testing.assert_close(grad_of(loss, last_layer), expected, rtol=1e-4, atol=1e-6)


def test_discriminator_is_off_before_disc_start(vae, x):
    loss_fn = small_loss(disc_start=5)
    posterior, recon = forward(vae, loss_fn, x)
    _, logs = loss_fn.generator_loss(x, recon, posterior, step=4)
    assert "g_loss" not in logs and not loss_fn.disc_active(4) and loss_fn.disc_active(5)


# ----------------------------------------------------------------------------- the two optimisers


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _unchanged(params, snapshot) -> bool:
    return all(torch.equal(p, s) for p, s in zip(params, snapshot))


def _trainer_objects(vae):
    """Autoencoder module, loss, and the two optimisers, built as train_vae builds them."""
    loss_fn = small_loss(disc_start=0)
    ae = Autoencode(vae, loss_fn.logvar)
    loop = LoopConfig(lr=1e-3)
    return ae, loss_fn, make_optimizer(ae.parameters(), loop), make_optimizer(loss_fn.discriminator.parameters(), loop)


def test_generator_step_never_changes_the_discriminator(vae, x):
    ae, loss_fn, opt_ae, _ = _trainer_objects(vae)
    disc = list(loss_fn.discriminator.parameters())
    disc_before, ae_before = _snapshot(disc), _snapshot(ae.parameters())
    posterior, recon = ae(x)
    g_loss, logs = loss_fn.generator_loss(x, recon, posterior, step=0, last_layer=vae.decoder.conv_out.weight)
    assert "g_loss" in logs  # the discriminator did score
    g_loss.backward()
    assert all(p.grad is None for p in disc), "the generator's loss sent gradient into the discriminator"
    assert all(p.requires_grad for p in disc)  # unfrozen again for its own step
    opt_ae.step()
    assert _unchanged(disc, disc_before)
    assert not _unchanged(ae.parameters(), ae_before)
    assert loss_fn.logvar.item() != 0.0  # the log-variance is among what opt_ae updates


def test_discriminator_step_never_changes_the_autoencoder(vae, x):
    ae, loss_fn, _, opt_d = _trainer_objects(vae)
    posterior, recon = ae(x)
    ae_params = list(ae.parameters())
    ae_before, disc_before = _snapshot(ae_params), _snapshot(loss_fn.discriminator.parameters())
    d_loss, _ = loss_fn.discriminator_loss(x, recon)
    d_loss.backward()
    assert all(p.grad is None for p in ae_params), "the discriminator's loss sent gradient into the autoencoder"
    opt_d.step()
    assert _unchanged(ae_params, ae_before)
    assert not _unchanged(loss_fn.discriminator.parameters(), disc_before)
