"""Train a small CLIP on image-caption pairs; its text tower can then condition stage 3.

    python train_clip.py --config configs/clip/shapes_cpu.yaml [key.sub=value ...]

Writes <out_dir>/text_encoder, tokenizer, image_encoder, eval.json (see ldm/train/clip.py).
Re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse

import yaml

from ldm.config import ConfigError, load_config, to_dict
from ldm.train.clip import ClipTrainConfig, train_clip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/clip/*.yaml); defaults apply to what it leaves out")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and stop")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 data.source.size=500")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ClipTrainConfig, args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.dry_run:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return
    train_clip(cfg)


if __name__ == "__main__":
    main()
