"""Train the noise-aware classifier of classifier guidance on the latent cache (issue #22).

Each step draws a fresh posterior sample of every latent, noises it at a random timestep exactly as
stage 3 does (`ldm.diffusion.noised_inputs`, with the noise schedule of the diffusion model it will
guide: set `noise.*` to that model's), and trains `NoisyClassifier` (ldm.models.classifier) with
cross-entropy on the labels (`labels`, ldm.data.labels).

Output (`<out_dir>/`): `classifier/` (the model and classifier.json: classes, the VAE identity,
the noise schedule, the per-noise-level accuracy), `eval.json` (accuracy on held-out latents in
`eval_bins` equal bins of t, the same noise at every evaluation), `accuracy.png` (that, drawn),
`metrics.jsonl`, `config.yaml`, `checkpoints/step-N/` for resume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ldm.config import require, to_dict
from ldm.data.cache import LatentCache, open_cache, vae_identity
from ldm.data.labels import cache_labels, label_spec_problem
from ldm.diffusion import NoiseConfig, make_train_scheduler, noised_inputs, scheduler_config
from ldm.models.classifier import NoisyClassifier, save_classifier
from ldm.models.vae import load_vae
from ldm.train.common import (LoopConfig, lr_lambda, make_accelerator, make_optimizer, register_schedule, resume,
                              sample_generators, start_run)
from ldm.train.ldm import size_batches
from ldm.train.loop import run_loop


@dataclasses.dataclass
class ClassifierModelConfig:
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 64, 128])  # one down block each
    layers_per_block: int = 1
    norm_num_groups: int = 8           # GroupNorm groups; must divide every width
    attention_head_dim: int = 8        # of the mid block's self-attention

    def validate(self) -> None:
        require(all(w % self.norm_num_groups == 0 for w in self.block_out_channels),
                f"model.norm_num_groups={self.norm_num_groups} must divide every width of {self.block_out_channels}")


@dataclasses.dataclass
class ClassifierTrainConfig:
    out_dir: str = "runs/classifier"   # the classifier lands in <out_dir>/classifier
    resume: str = "latest"             # "latest", "" or a checkpoint path
    cache: str = "runs/latents"        # latent cache (stage 2 output)
    vae: str = "runs/vae/vae"          # the VAE the cache was encoded with (checked by weight hash and scale)
    labels: str = "shapes:shape"       # shapes:<attribute> | folder (ldm.data.labels)
    model: ClassifierModelConfig = dataclasses.field(default_factory=ClassifierModelConfig)
    noise: NoiseConfig = dataclasses.field(default_factory=NoiseConfig)  # the guided model's schedule (diffusion only)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    eval_bins: int = 10                # equal bins of t for the accuracy per noise level
    eval_batches: int = 4              # held-out batches (train.batch_size each) per bin

    def validate(self) -> None:
        problem = label_spec_problem(self.labels)
        require(problem is None, f"labels: {problem}")
        require(self.noise.objective == "diffusion", "noise.objective: classifier guidance here guides diffusion "
                "models (epsilon or v); flow models are not supported")
        require(Path(self.cache).is_dir(), f"cache: no latent cache directory {self.cache!r} (run the encode stage first)")
        require(1 <= self.eval_bins <= self.noise.num_train_timesteps, f"eval_bins must be in [1, num_train_timesteps], got {self.eval_bins}")
        require(self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}")


def train_classifier(cfg: ClassifierTrainConfig) -> Path:
    out_dir, loop = Path(cfg.out_dir), cfg.train
    accelerator = make_accelerator(loop, out_dir)
    # --- data: the cache must come from this VAE; labels from its records
    identity = vae_identity(load_vae(cfg.vae))
    cache = open_cache(cfg.cache, "train", expect=identity)
    held_out = open_cache(cfg.cache, "eval", expect=identity)
    classes, labels = cache_labels(cache, cfg.labels)
    _, held_labels = cache_labels(held_out, cfg.labels, classes)
    log = start_run(accelerator, cfg, out_dir, "classifier")
    accelerator.print(f"classifier over {len(classes)} classes ({cfg.labels}): {', '.join(classes)}; "
                      f"{len(cache)} training and {len(held_out)} held-out latents")

    # --- model, optimiser, resume
    torch.manual_seed(loop.seed)
    model = NoisyClassifier(in_channels=cache.manifest["latent_channels"], num_classes=len(classes),
                            **{k: tuple(v) if isinstance(v, list) else v for k, v in to_dict(cfg.model).items()})
    noise_scheduler = make_train_scheduler(cfg.noise)
    optimizer = make_optimizer(model.parameters(), loop)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(loop))
    model, optimizer = accelerator.prepare(model, optimizer)
    register_schedule(accelerator, lr_sched)
    step, guard = resume(accelerator, out_dir, cfg.resume, loop.max_nonfinite_steps)
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = size_batches(cache.size_groups(), loop.batch_size, loop.seed, step * loop.grad_accum, rank, world)
    model.train()

    def train_step(step: int) -> dict:
        losses, right, seen = [], 0, 0
        for micro in range(loop.grad_accum):
            indices = next(batches)
            gen = sample_generators(loop.seed, step, micro, rank * len(indices), len(indices))
            latents = cache.latents(indices, generator=gen).to(accelerator.device)
            noisy, t, _, _ = noised_inputs(noise_scheduler, cfg.noise, latents, gen)  # x_t as stage 3 sees it
            target = labels[indices].to(accelerator.device)
            with accelerator.accumulate(model):
                logits = model(noisy, t)
                loss = F.cross_entropy(logits, target)
                if guard.ok(loss):
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and loop.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            right, seen = right + (logits.argmax(-1) == target).sum().item(), seen + len(indices)
        lr = lr_sched.get_last_lr()[0]
        lr_sched.step()
        return {"loss": torch.stack(losses).mean(), "accuracy": right / seen, "lr": lr}

    def evaluate(step: int) -> dict:
        net = accelerator.unwrap_model(model)
        result = accuracy_by_noise_level(net, held_out, held_labels, noise_scheduler, cfg)
        result.update(step=step, classes=classes, labels=cfg.labels)
        log.write(step, val_accuracy=result["accuracy"], **{f"val_accuracy/bin{b['bin']}": b["accuracy"] for b in result["bins"]})
        (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
        plot_accuracy(result, out_dir / "accuracy.png")
        net.train()
        return result

    def export(step: int) -> None:
        result = evaluate(step)
        save_classifier(accelerator.unwrap_model(model), out_dir / "classifier", {
            "classes": classes, "labels": cfg.labels, "vae": identity,
            "noise_schedule": scheduler_config(cfg.noise), "eval": result, "train_config": to_dict(cfg)})

    run_loop(accelerator, loop, out_dir, log, guard, step, "classifier", train_step, evaluate, export)
    return out_dir / "classifier"


@torch.no_grad()
def accuracy_by_noise_level(model: NoisyClassifier, held_out: LatentCache, labels: torch.Tensor, noise_scheduler,
                            cfg: ClassifierTrainConfig) -> dict:
    """Held-out accuracy in `eval_bins` equal bins of t: every batch is noised at each bin's middle
    timestep, with noise fixed by a seed, so evaluations compare across steps and runs."""
    model.eval()
    device = next(model.parameters()).device
    T, bins, bs = cfg.noise.num_train_timesteps, cfg.eval_bins, cfg.train.batch_size
    groups = [items[s : s + bs] for items in held_out.size_groups().values() for s in range(0, len(items), bs)]
    groups = groups[: cfg.eval_batches]
    out = []
    for b in range(bins):
        low, high = b * T // bins, (b + 1) * T // bins
        t_mid = (low + high - 1) // 2
        gen = torch.Generator().manual_seed(1234)
        right = n = 0
        for indices in groups:
            latents = held_out.latents(indices, generator=gen).to(device)
            noise = torch.randn(latents.shape, generator=gen).to(device)
            t = torch.full((len(indices),), t_mid, dtype=torch.long, device=device)
            noisy = noise_scheduler.add_noise(latents, noise, t)
            right += (model(noisy, t).argmax(-1).cpu() == labels[indices]).sum().item()
            n += len(indices)
        out.append({"bin": b, "t_low": low, "t_high": high - 1, "t": t_mid, "accuracy": right / max(n, 1), "n": n})
    return {"accuracy": sum(b["accuracy"] for b in out) / bins, "bins": out}


def plot_accuracy(result: dict, path: Path) -> None:
    """Held-out accuracy against the timestep of the noise (one point per bin), with chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot([b["t"] for b in result["bins"]], [b["accuracy"] for b in result["bins"]], "o-", label="held-out accuracy")
    ax.axhline(1 / len(result["classes"]), color="gray", ls="--", label=f"chance (1/{len(result['classes'])})")
    ax.set(xlabel="timestep t of the noise", ylabel="accuracy", ylim=(0, 1.02),
           title=f"noise-aware classifier, {result['labels']}, step {result['step']}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
