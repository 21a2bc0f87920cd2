"""`python -m ldm.data.check`: scan a data source and report what is usable, converted, skipped.

    python -m ldm.data.check --kind imagefolder --path my_photos
    python -m ldm.data.check --kind imagefolder --path my_photos --resolution 512 --small-policy skip
    python -m ldm.data.check --config my_run.yaml          # its data.source / data.transform sections

Without a transform (no --resolution, no transform section) image sizes are not judged.
Exit status: 0 when at least one image is usable, 1 when none is, 2 for a bad config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ldm.config import ConfigError, from_dict, validate
from ldm.data.sources import DataReport, SizedSource, SourceConfig, check_compatible, open_source
from ldm.data.transforms import TransformConfig


@dataclasses.dataclass
class DataCheckConfig:
    source: SourceConfig = dataclasses.field(default_factory=SourceConfig)
    transform: TransformConfig | None = None  # with it, images smaller than their target are judged


def check_source(cfg: SourceConfig, transform: TransformConfig | None = None, progress: bool = True) -> DataReport:
    """Read every item of the source once (as training would) and return the report."""
    report = DataReport()
    source = open_source(cfg, report, transform)
    total = len(source) if isinstance(source, SizedSource) else None
    with tqdm(total=total, desc="checking", unit="file", disable=not progress) as bar:
        for _ in source:  # every item ends as exactly one "ok" or one skip: that is the progress
            bar.update(report.counts["ok"] + report.skipped - bar.n)
        bar.update(report.counts["ok"] + report.skipped - bar.n)
    return report


# Command-line flag -> (section, key). Flags left out keep the config file's value or the default.
FLAGS: dict[str, tuple[str, str, dict]] = {
    "--kind": ("source", "kind", {"choices": ["shapes", "imagefolder", "hf", "webdataset"]}),
    "--path": ("source", "path", {"help": "folder, datasets dir or hub name, .tar / folder of .tar / glob"}),
    "--split": ("source", "split", {}),
    "--streaming": ("source", "streaming", {"action": "store_true", "default": None}),
    "--image-column": ("source", "image_column", {}),
    "--caption-column": ("source", "caption_column", {}),
    "--caption-ext": ("source", "caption_ext", {}),
    "--no-caption": ("source", "no_caption", {"choices": ["keep", "skip"]}),
    "--max-pixels": ("source", "max_pixels", {"type": int}),
    "--resolution": ("transform", "resolution", {"type": int, "help": "px; judges sizes against this target"}),
    "--small-policy": ("transform", "small_policy", {"choices": ["skip", "upscale"]}),
    "--buckets": ("transform", "buckets", {"action": "store_true", "default": None}),
    "--bucket-pixels": ("transform", "bucket_pixels", {"type": int}),
    "--bucket-step": ("transform", "bucket_step", {"type": int}),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ldm.data.check", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file with a source: section (top level or under data:)")
    for flag, (_, _, options) in FLAGS.items():
        parser.add_argument(flag, **options)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> DataCheckConfig:
    """The YAML file's source/transform sections, overridden by the flags given, validated."""
    data = _sections(Path(args.config)) if args.config else {"source": {}}
    for flag, (section, key, _) in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            data.setdefault(section, {})[key] = value
    cfg = from_dict(DataCheckConfig, data)
    validate(cfg)
    if cfg.transform is not None:
        check_compatible(cfg.source, cfg.transform)
    return cfg


def _sections(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    section = doc.get("data", doc) if isinstance(doc, dict) else None
    if not isinstance(section, dict) or not isinstance(section.get("source"), dict):
        raise ConfigError(f"{path} has no source: section (looked for data.source and source)")
    return {k: dict(section[k]) for k in ("source", "transform") if isinstance(section.get(k), dict)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = build_config(args)
        report = check_source(cfg.source, cfg.transform, progress=not args.quiet)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    if not report.counts["ok"]:
        print("error: no usable image in this source", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
