"""Command-line entry points: each parses `--config FILE key.sub=value ...` and calls the library.

The top-level scripts (train_vae.py, encode.py, train_ldm.py, distill.py, infer.py) and the console
scripts from pyproject.toml both land here.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from ldm.config import ConfigError, load_config, to_dict


def _stage_parser(description: str, resumable: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 out_dir=runs/x")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    if resumable:
        parser.add_argument("--resume", metavar="latest|PATH|''",
                            help="same as the override resume=...: 'latest' (the default) continues from the newest "
                                 "checkpoint in out_dir, a path from that checkpoint, '' starts afresh")
    return parser


def _load(cls, description: str, argv):
    resumable = any(f.name == "resume" for f in dataclasses.fields(cls))
    args = _stage_parser(description, resumable).parse_args(argv)
    overrides = list(args.overrides)
    if getattr(args, "resume", None) is not None:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(cls, args.config, overrides)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return None
    return cfg


def train_vae_main(argv=None) -> None:
    from ldm.train.vae import VAETrainConfig, train_vae

    cfg = _load(VAETrainConfig, "Stage 1: train or fine-tune a KL-VAE (AutoencoderKL).", argv)
    if cfg is not None:
        print(f"VAE saved to {train_vae(cfg)}")


def encode_main(argv=None) -> None:
    from ldm.train.encode import EncodeConfig, encode_dataset

    cfg = _load(EncodeConfig, "Stage 2: encode a dataset into a latent cache (resumable; accelerate launch for many GPUs).", argv)
    if cfg is not None:
        encode_dataset(cfg)


def train_ldm_main(argv=None) -> None:
    from ldm.train.ldm import LDMTrainConfig, train_ldm

    cfg = _load(LDMTrainConfig, "Stage 3: train the text-conditioned U-Net on a latent cache.", argv)
    if cfg is not None:
        print(f"pipeline saved to {train_ldm(cfg)}")


def train_classifier_main(argv=None) -> None:
    from ldm.train.classifier import ClassifierTrainConfig, train_classifier

    cfg = _load(ClassifierTrainConfig, "Train the noise-aware classifier of classifier guidance on a latent cache.", argv)
    if cfg is not None:
        print(f"classifier saved to {train_classifier(cfg)}")


def distill_main(argv=None) -> None:
    from ldm.train.distill import DistillConfig, distill

    cfg = _load(DistillConfig, "Latent consistency distillation (LCM) of a trained pipeline into a 1-4 step sampler.", argv)
    if cfg is not None:
        try:
            print(f"student pipeline saved to {distill(cfg)}")
        except ConfigError as err:  # what only the loaded teacher shows (a single file's U-Net, say)
            sys.exit(f"config error: {err}")


def infer_main(argv=None) -> None:
    from ldm.infer import main

    main(argv)
