"""Stage 1: train (or fine-tune) a KL-VAE, measure its latent scale, save an AutoencoderKL dir.

Output (`<out_dir>/`): `vae/` (AutoencoderKL.save_pretrained, EMA weights when EMA is on, with
`scaling_factor`/`shift_factor` measured on the training data; a fine-tune keeps the pretrained
VAE's unless `model.remeasure_scale`), `eval.json` (held-out PSNR,
SSIM, rFID when a feature network is available, latent std after scaling), `recon-*.png`
grids, `metrics.jsonl`, `config.yaml`, and `checkpoints/step-N/` for resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ldm.config import require
from ldm.data.captions import CaptionConfig
from ldm.data.images import DataConfig, ImageStore, image_grid, load_images
from ldm.losses import VAELoss, VAELossConfig
from ldm.metrics import default_inception_path, reconstruction_metrics
from ldm.models.vae import (VAEModelConfig, build_vae, downsample_factor, freeze_encoder, latent_scale,
                            measure_latent_scale, save_vae)
from ldm.quality import check_run_history, check_spec, load_feature_network
from ldm.single_file import resolve_models
from ldm.train.common import (register_schedule, LoopConfig, batch_indices, lr_lambda,
                              make_accelerator, make_optimizer, resume, start_run)
from ldm.train.ema import make_ema, swapped_ema
from ldm.train.loop import run_loop


@dataclasses.dataclass
class VAETrainConfig:
    out_dir: str = "runs/vae"          # run directory; the AutoencoderKL lands in <out_dir>/vae
    resume: str = "latest"             # "latest" (re-running the same command resumes), "" or a checkpoint path
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: VAEModelConfig = dataclasses.field(default_factory=VAEModelConfig)
    loss: VAELossConfig = dataclasses.field(default_factory=VAELossConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    disc_lr: float = 0.0               # discriminator LR (0: same as train.lr)
    scale_images: int = 512            # training images used to measure the latent scale
    crop_size: int = 0                 # train on random square crops of this size (px); 0: whole images.
                                       # The autoencoder is convolutional, so crops teach it the same
                                       # mapping at a fraction of the cost (SD's VAE: 256 px crops)
    locality_weight: float = 0.0       # weight of the locality term (`locality_loss`): a crop's code must be the
                                       # code of that window of the whole image, so an object's code does not
                                       # depend on the rest of the scene (issue #23, docs/composition.md)
    locality_crop: int = 0             # its crops' size in px (a multiple of the downsampling factor); 0: half the image
    composite_weight: float = 0.0      # weight of the cut-and-paste term (`composite_loss`): a rectangle of one image's
                                       # code pasted into another's must encode from, and decode to, the pasted image
    grid_images: int = 16              # held-out images in each reconstruction grid
    fid: bool = False                  # rFID/rKID on the held-out set with FID's Inception (see ldm.metrics)
    fid_weights: str = ""              # torch-fidelity's Inception weights file; "": torch's hub cache
    features: str = ""                 # rFID/rKID with another network: "clip:<dir>" (train_clip.py's) or
                                       # "inception:<file>" (ldm/quality.py); "": Inception when fid is true

    def validate(self) -> None:
        require(self.data.captions == CaptionConfig(),
                "data.captions: the VAE trains on images alone and never reads a caption; remove data.captions")
        require(self.scale_images > 0, "scale_images must be > 0")
        require(self.crop_size >= 0, "crop_size must be >= 0")
        require(self.locality_weight >= 0 and self.locality_crop >= 0, "locality_weight and locality_crop must be >= 0")
        require(self.composite_weight >= 0, "composite_weight must be >= 0")
        require(not self.composite_weight or self.train.batch_size >= 2,
                "composite_weight pastes between the images of a batch: train.batch_size must be >= 2")
        check_spec("features", self.features)
        if self.fid and not self.features:
            weights = Path(self.fid_weights) if self.fid_weights else default_inception_path()
            require(weights.is_file(), f"fid: true needs FID's Inception weights on disk, not found at {weights}; "
                                       "set fid_weights to the file, or fid=false")
        if not self.model.pretrained:
            factor = 2 ** (len(self.model.block_out_channels or [0] * _preset_levels(self.model.preset)) - 1)
            require(self.data.transform.resolution % factor == 0,
                    f"data.transform.resolution={self.data.transform.resolution} is not divisible by the "
                    f"VAE's downsampling factor {factor} (model.preset={self.model.preset})")
            require(self.crop_size % factor == 0,
                    f"crop_size={self.crop_size} is not divisible by the VAE's downsampling factor {factor}")
            require(self.locality_crop % factor == 0,
                    f"locality_crop={self.locality_crop} is not divisible by the VAE's downsampling factor {factor}")


def _preset_levels(preset: str) -> int:
    from ldm.models.presets import vae_config

    return len(vae_config(preset)["block_out_channels"])


def train_vae(cfg: VAETrainConfig, features: torch.nn.Module | None = None) -> Path:
    """Train (or fine-tune) the VAE; returns the exported AutoencoderKL directory.

    `features`: the network for rFID/rKID on held-out images (in [-1, 1] -> (B, D), see
    ldm.metrics); default: the one `cfg.features` names, else Inception when `cfg.fid`, else no rFID.
    The figures name the network (`features`, "custom" for a module passed here) and N.
    """
    out_dir = Path(cfg.out_dir)
    loop = cfg.train
    accelerator = make_accelerator(loop, out_dir)
    log = start_run(accelerator, cfg, out_dir, "vae")
    torch.manual_seed(loop.seed)

    # --- data: decoded once; held-out images for evaluation
    train_set = load_images(cfg.data, "train", desc=None if accelerator.is_main_process else "")
    eval_set = load_images(cfg.data, "eval", desc="")
    if accelerator.is_main_process:
        print(train_set.report.summary())
    require(len(train_set) >= loop.batch_size * accelerator.num_processes,
            f"only {len(train_set)} usable training images, fewer than one batch")

    features_name = "custom" if features is not None else ""
    if features is None and (cfg.features or cfg.fid):
        network = load_feature_network(cfg.features or f"inception:{cfg.fid_weights}", accelerator.device)
        features, features_name = network.image, network.identity
        check_run_history(out_dir / "metrics.jsonl", features_name, len(eval_set), "eval/", "features/data.eval_size")

    # --- model (a single file to fine-tune: read from its imported directory), loss (logvar,
    # LPIPS, discriminator), optimisers, EMA
    vae = build_vae(resolve_models(cfg, "model.pretrained").model, cfg.data.transform.resolution)
    if cfg.model.train_decoder_only:
        freeze_encoder(vae)
    loss_fn = VAELoss(cfg.loss).to(accelerator.device)
    # important: logvar rides in the autoencoder's module, so opt_ae updates it and DDP averages
    # its gradient; the discriminator is prepared on its own, with its own optimiser.
    ae = Autoencode(vae, loss_fn.logvar)
    opt_ae = make_optimizer([p for p in ae.parameters() if p.requires_grad], loop)
    opt_d = make_optimizer(loss_fn.discriminator.parameters(), loop, lr=cfg.disc_lr or loop.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_ae, lr_lambda(loop))
    # The discriminator's schedule counts its own steps, from disc_start: a new discriminator warms
    # up when it starts (not during steps it never takes), then decays to 0 at the run's end with
    # the generator's, so neither side keeps a full rate against a frozen other.
    disc_loop = dataclasses.replace(loop, steps=max(1, loop.steps - cfg.loss.disc_start))
    d_sched = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_lambda(disc_loop))
    ae, disc, opt_ae, opt_d = accelerator.prepare(ae, loss_fn.discriminator, opt_ae, opt_d)
    register_schedule(accelerator, sched)
    vae = accelerator.unwrap_model(ae).vae
    ema = make_ema(vae.parameters(), loop, accelerator.device)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    register_schedule(accelerator, d_sched)  # after the EMA: the objects keep their checkpoint indices

    # --- resume: re-running the same command continues from the newest complete checkpoint
    step, guard = resume(accelerator, out_dir, cfg.resume, loop.max_nonfinite_steps)
    batches = batch_indices(len(train_set), loop.batch_size, loop.seed, step * loop.grad_accum,
                            accelerator.process_index, accelerator.num_processes)
    last_layer = vae.decoder.conv_out.weight

    # --- the loop (ldm.train.loop.run_loop): each step, each evaluation (EMA weights), the export
    def train_step(step: int) -> dict:
        for _ in range(loop.grad_accum):
            x = random_crop(train_set.batch(next(batches)), cfg.crop_size, loop.seed, step).to(accelerator.device)
            # important: one accumulate() for both models; each call counts a micro-batch, so a
            # second one per micro-batch would shift which micro-batches step each optimiser.
            # autocast: LPIPS and the discriminator's scoring run in mixed precision too.
            with accelerator.accumulate(ae, disc), accelerator.autocast():
                # generator step: autoencoder + logvar; the discriminator only scores, frozen
                posterior, recon = ae(x)
                g_loss, logs = loss_fn.generator_loss(x, recon, posterior, step, last_layer)
                if cfg.locality_weight:
                    local = locality_loss(ae, x, posterior.mean, cfg.locality_crop, loop.seed, step)
                    g_loss = g_loss + cfg.locality_weight * local
                    logs["locality"] = local.item()
                if cfg.composite_weight:
                    encoded, decoded = composite_loss(ae, x, posterior.mean, loop.seed, step)
                    g_loss = g_loss + cfg.composite_weight * (encoded + decoded)
                    logs.update(composite_enc=encoded.item(), composite_dec=decoded.item())
                if guard.ok(g_loss):
                    accelerator.backward(g_loss)
                    if accelerator.sync_gradients and loop.max_grad_norm:  # the norm before clipping
                        logs["grad_norm"] = accelerator.clip_grad_norm_(ae.parameters(), loop.max_grad_norm)
                    opt_ae.step()  # a no-op until the last micro-batch of the step
                opt_ae.zero_grad(set_to_none=True)
                # discriminator step on detached reconstructions: never reaches the autoencoder
                if loss_fn.disc_active(step):
                    d_loss, d_logs = loss_fn.discriminator_loss(x, recon, disc)
                    if guard.ok(d_loss, "discriminator"):  # its own run: a finite one must not hide a NaN generator
                        accelerator.backward(d_loss)
                        opt_d.step()
                    opt_d.zero_grad(set_to_none=True)
                    logs.update(d_logs)
        sched.step()  # important: once per optimiser step, not per micro-batch, or warm-up ends grad_accum x early
        if loss_fn.disc_active(step):
            d_sched.step()
        if ema is not None:
            ema.step(vae.parameters())
        # after the schedules stepped: the rates the next step uses (what stage 1 has always logged)
        disc_lr = d_sched.get_last_lr()[0] if loss_fn.disc_active(step + 1) else 0.0
        return {"lr": sched.get_last_lr()[0], "disc_lr": disc_lr, **logs}

    def evaluate(step: int) -> None:
        with swapped_ema(ema, vae.parameters()):
            results = evaluate_vae(vae, eval_set, out_dir / f"recon-{step:06d}.png", cfg, features, features_name)
        log.write(step, **{f"eval/{k}": v for k, v in results.items()})

    def export(step: int) -> None:
        """The EMA weights, the latent scale measured on training data, the held-out evaluation."""
        if ema is not None:
            ema.copy_to(vae.parameters())
        vae.eval()
        export_vae(vae, train_set, eval_set, out_dir, cfg, features, features_name)
        final = json.loads((out_dir / "eval.json").read_text())
        log.write(step, **{f"final/{k}": v for k, v in final.items() if isinstance(v, (int, float))})

    run_loop(accelerator, loop, out_dir, log, guard, step, "vae", train_step, evaluate, export, shown="rec")
    return out_dir / "vae"


def random_crop(x: torch.Tensor, size: int, seed: int, step: int) -> torch.Tensor:
    """One random square crop for the whole batch, fixed by (seed, step) so resume is exact."""
    if not size or size >= x.shape[-1]:
        return x
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    top, left = (int(torch.randint(0, n - size + 1, (1,), generator=g)) for n in x.shape[-2:])
    return x[..., top : top + size, left : left + size]


def locality_loss(ae: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, crop: int, seed: int, step: int) -> torch.Tensor:
    """How far the code of a crop of `x` lies from the code `z` (the posterior means of the whole
    images) over the same window, squared distance summed per image as the KL is, excluding the
    window's outer ring of latent cells, where the crop's padding stands for the rest of the image.

    A convolutional encoder with GroupNorm (AutoencoderKL's, at every level) and mid-block
    attention codes each cell from statistics of the whole image: on `shapes`, an object's code
    depends on its background, so a green object on black, never in the U-Net's captions, has a
    code the U-Net cannot put together from green on gray and black backgrounds. This term asks
    the encoder for codes that depend on what is near a cell only. One crop position per batch,
    aligned to the latent grid and fixed by (seed, step), so resume is exact.
    """
    factor = x.shape[-1] // z.shape[-1]
    size = crop or x.shape[-1] // 2
    cells = size // factor
    require(2 < cells <= z.shape[-1], f"locality_crop={size} px is {cells} latent cells; it needs 3 or more "
                                      f"(the outer ring is left out), and no more than the image's {z.shape[-1]}")
    g = torch.Generator().manual_seed(seed * 1_000_033 + step)
    top, left = (int(torch.randint(0, n - cells + 1, (1,), generator=g)) for n in z.shape[-2:])
    window = z[..., top : top + cells, left : left + cells]
    x_crop = x[..., top * factor : (top + cells) * factor, left * factor : (left + cells) * factor]
    z_crop = ae(x_crop, encode_only=True)
    inner = (slice(None), slice(None), slice(1, cells - 1), slice(1, cells - 1))
    return (z_crop[inner] - window[inner]).pow(2).flatten(1).sum(1).mean()


def composite_loss(ae: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, seed: int,
                   step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder term, decoder term) of cut-and-paste consistency, over the pairs (first half of the batch,
    second half): a rectangle of latent cells from one image's code `z` (posterior means) pasted into the
    other's must be the code of the image pasted the same way, and must decode to it. Both are measured
    away from the rectangle's edge (one latent cell each side), where a cell mixes the two images.

    `locality_loss` asks the encoder alone for local codes; its decoder still reads the whole image's
    statistics (GroupNorm), so a code put together from parts, which is what a U-Net that composes
    writes, decodes to something else. The encoder term is divided by the codes' variance (detached),
    so it cannot be met by shrinking every code; the decoder term is summed per image, as the NLL is.
    One rectangle per batch, its place and size fixed by (seed, step), so resume is exact.
    """
    n = x.shape[0] // 2
    h, w = z.shape[-2:]
    factor = x.shape[-1] // w
    require(n > 0 and min(h, w) >= 5, f"composite_weight needs 2 or more images a batch and 5 or more latent cells a "
                                      f"side, got {x.shape[0]} of {h}x{w}")
    g = torch.Generator().manual_seed(seed * 1_000_037 + step)

    def span(side: int) -> slice:
        length = int(torch.randint(3, side - 1, (1,), generator=g))
        start = int(torch.randint(0, side - length + 1, (1,), generator=g))
        return slice(start, start + length)

    mask = torch.zeros(1, 1, h, w, device=z.device, dtype=z.dtype)
    mask[..., span(h), span(w)] = 1

    def eroded(m: torch.Tensor) -> torch.Tensor:  # the image's own border is no edge (max_pool pads with -inf)
        return -torch.nn.functional.max_pool2d(-m, 3, 1, 1)

    valid = eroded(mask) + eroded(1 - mask)
    pixels = mask.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    valid_pixels = valid.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    a, b, z_a, z_b = x[:n], x[n : 2 * n], z[:n], z[n : 2 * n]
    pasted_image = pixels * a + (1 - pixels) * b
    pasted_code = mask * z_a + (1 - mask) * z_b
    encoded = ((ae(pasted_image, encode_only=True) - pasted_code).pow(2) * valid).sum() / n / z.detach().var()
    decoded = ((ae(pasted_code, decode_only=True) - pasted_image).abs() * valid_pixels).sum() / n
    return encoded, decoded


class Autoencode(torch.nn.Module):
    """encode -> sample -> decode in one forward, so DDP sees (and syncs) the whole autoencoder,
    and the NLL's learned log-variance (used by the loss after this forward) with it."""

    def __init__(self, vae, logvar: torch.nn.Parameter):
        super().__init__()
        self.vae, self.logvar = vae, logvar

    def forward(self, x: torch.Tensor, encode_only: bool = False, decode_only: bool = False):
        if decode_only:  # x is a code (the composite term's pasted ones)
            return self.vae.decode(x).sample
        posterior = self.vae.encode(x).latent_dist
        if encode_only:  # the posterior mean (the locality term's crops)
            return posterior.mean
        return posterior, self.vae.decode(posterior.sample()).sample


@torch.no_grad()
def evaluate_vae(vae, eval_set: ImageStore, grid_path: Path | None, cfg: VAETrainConfig,
                 features: torch.nn.Module | None = None, features_name: str = "custom", batch_size: int = 32) -> dict:
    """Held-out PSNR/SSIM (and rFID/rKID with `features`, named with the network and N) from the
    posterior mode; saves a grid of pairs."""
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    reals, recons = [], []
    for start in range(0, len(eval_set), batch_size):
        x = eval_set.batch(list(range(start, min(start + batch_size, len(eval_set))))).to(device)
        recons.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1).cpu())
        reals.append(x.cpu())
    real, recon = torch.cat(reals), torch.cat(recons)
    results = reconstruction_metrics(real, recon, fid=features is not None, features=features)
    if features is not None:
        results.update(features=features_name, n=len(real))
    if grid_path is not None:
        n = min(cfg.grid_images, len(real))
        pairs = torch.stack([real[:n], recon[:n]], 1).flatten(0, 1)
        image_grid(pairs, nrow=8).save(grid_path)
    vae.train(was_training)
    return results


def export_vae(vae, train_set: ImageStore, eval_set: ImageStore, out_dir: Path, cfg: VAETrainConfig,
               features: torch.nn.Module | None = None, features_name: str = "custom") -> None:
    """Measure the latent scale on training images (a fine-tune keeps its own), store it in the
    config, save, evaluate."""
    scale, shift = export_latent_scale(vae, train_set, cfg)
    save_vae(vae, out_dir / "vae", scale, shift)
    results = evaluate_vae(vae, eval_set, out_dir / "recon-final.png", cfg, features, features_name)
    results.update(held_out_latent_stats(vae, eval_set))
    results.update(scaling_factor=scale, shift_factor=shift, downsample_factor=downsample_factor(vae))
    results["split"] = eval_set.split  # which held-out images these figures come from
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2))
    print("vae eval:", json.dumps(results))


def export_latent_scale(vae, train_set: ImageStore, cfg: VAETrainConfig) -> tuple[float, float]:
    """(scaling_factor, shift_factor) to save: measured on the training images, except that a
    fine-tune keeps the pretrained VAE's unless `model.remeasure_scale`. The U-Nets trained on
    that VAE (SD's 0.18215) take latents at its scale; a new one would no longer fit them."""
    if cfg.model.pretrained and not cfg.model.remeasure_scale:
        return latent_scale(vae)
    n = min(cfg.scale_images, len(train_set))
    batches = (train_set.batch(list(range(s, min(s + 32, n)))) for s in range(0, n, 32))
    return measure_latent_scale(vae, batches, use_shift=cfg.model.use_shift)


@torch.no_grad()
def held_out_latent_stats(vae, eval_set: ImageStore) -> dict:
    """Std (and mean) of held-out latents after the stored scaling: should be ~1 (and ~0)."""
    scale, shift = latent_scale(vae)
    device = next(vae.parameters()).device
    zs = [vae.encode(eval_set.batch(list(range(s, min(s + 32, len(eval_set))))).to(device)).latent_dist.sample()
          for s in range(0, len(eval_set), 32)]
    z = (torch.cat(zs) - shift) * scale
    return {"latent_std": z.std().item(), "latent_mean": z.mean().item()}
