"""Which records are held out: a stable hash of each record's key, never its position.

Real folders are sorted by name, date or category, so "the last N records" is often a single
kind. Here a record is held out by a hash of its key (file name relative to the source root, or a
tar member's `__key__`): the same on every machine, in every run, whatever the order of the
records and the number of processes, and no key is in both splits.

Three ways to choose the held-out keys (`ldm.data.images.DataConfig`), each a `HeldOut`:

- a count N (`eval_size`): the N keys with the smallest hashes (`heldout_by_count`), which
  needs every key of the source first (a sized source lists them without decoding an image);
  the sets are nested, so a smaller N holds out a subset of a larger N's records;
- a fraction f (`eval_fraction`): each key whose hash is below f (`is_heldout`), decided as
  the record passes, so it also works on a stream of unknown length;
- an explicit list (`heldout`): a text file of keys, one a line (like the `heldout.txt` a
  prepared folder holds), or a folder of images.

`HeldOut.record()` is what every stage writes beside its held-out figures (cache manifest,
eval.json, ldm.json): the rule, the settings, the number of held-out keys and a SHA-256 of them
sorted, so two figures can be checked to come from the same held-out set.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from ldm.config import ConfigError

SPLIT_RULE = "sha256-v1"  # recorded beside every held-out figure; change it only with a new name
LIST_RULE = "list"         # the held-out keys are named by a file or folder
SHAPES_RULE = "shapes-seed"  # the synthetic shapes: the held-out images are drawn with another seed


def key_hash(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (the first 64 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def heldout_by_count(keys, count: int) -> set[str]:
    """The `count` keys with the smallest hashes: a uniform random subset fixed by the keys alone."""
    return set(sorted(set(keys), key=lambda k: (key_hash(k), k))[:count])


def is_heldout(key: str, fraction: float) -> bool:
    """For a stream whose length is unknown: held out when the key's hash falls below `fraction`."""
    return key_hash(key) < fraction


def keys_digest(keys) -> str:
    """SHA-256 of the distinct keys, sorted, one a line: the identity of a held-out set."""
    return hashlib.sha256("".join(f"{k}\n" for k in sorted(set(keys))).encode("utf-8")).hexdigest()


def read_key_list(path: str | Path) -> list[str]:
    """The keys of a held-out list: one a line (blank lines ignored; a key may start with anything)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.heldout: cannot read the key list {path}: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclasses.dataclass
class HeldOut:
    """The held-out split of one source: which keys are in it, and the record of how it was chosen.

    `keys` is the held-out set when it is known before reading (a sized source, or a list);
    otherwise (a stream with `eval_fraction`) each key is decided by its hash as it passes and
    the held-out keys seen are collected, so the record is complete after one full pass.
    """

    rule: str                        # SPLIT_RULE, LIST_RULE or SHAPES_RULE
    settings: dict                   # what chose it: eval_size / eval_fraction / heldout, as configured
    keys: frozenset[str] | None      # the held-out keys, when known up front
    fraction: float = 0.0            # keys is None: held out when key_hash(key) < fraction
    list_file: str = ""              # keys came from this file: a listed key never seen is an error
    folder: str = ""                 # the held-out records are this folder's (read apart from the source)
    seen: set[str] = dataclasses.field(default_factory=set)  # held-out keys met in a pass (streams)
    complete: bool = False           # a pass has gone through every key (streams)

    def __contains__(self, key: str) -> bool:
        held = key in self.keys if self.keys is not None else is_heldout(key, self.fraction)
        if held:
            self.seen.add(key)
        return held

    def finish_pass(self) -> None:
        """Called after a pass over every key: for a stream, the held-out set is now known."""
        self.complete = True
        if self.list_file and self.keys is not None:
            check_listed(self.keys, self.seen, self.list_file)

    def record(self) -> dict:
        """{rule, settings..., count, keys_sha256}; count and hash are None for a stream not yet read."""
        known = self.keys if self.keys is not None else (self.seen if self.complete else None)
        return {"rule": self.rule, **self.settings,
                "count": None if known is None else len(known),
                "keys_sha256": None if known is None else keys_digest(known)}


def check_listed(listed, found, list_file: str) -> None:
    """A clear error for keys named by a held-out list that the source does not have."""
    missing = sorted(set(listed) - set(found))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ConfigError(f"data.heldout: {list_file} names {len(missing)} key(s) the source does not have: "
                          f"{', '.join(missing[:5])}{more}")


def covers(upstream: dict, downstream: dict) -> bool:
    """Whether no record `downstream` holds out (split records of the same source) was trained on
    upstream: the upstream held-out set includes the downstream one.

    Count and fraction rules nest (a smaller count or fraction holds out a subset), so that is
    decided from the settings; held-out shapes are drawn apart from every training image, at any
    count; anything else only when the two sets are the same.
    """
    if upstream.get("keys_sha256") and upstream.get("keys_sha256") == downstream.get("keys_sha256"):
        return True
    if upstream.get("rule") != downstream.get("rule") or upstream.get("seed") != downstream.get("seed"):
        return False
    if upstream["rule"] == SHAPES_RULE:
        return True
    for nested in ("eval_size", "eval_fraction"):
        if upstream.get(nested) is not None and downstream.get(nested) is not None:
            return downstream[nested] <= upstream[nested]
    return False


def upstream_split_problem(run_dir: str | Path, source: dict, split: dict, stage: str) -> str | None:
    """Why a stage's held-out split is unsafe against the run in `run_dir` (one that wrote
    config.yaml and an eval.json with a `split`, e.g. the VAE's or the CLIP's), or None.

    Only a run on the same source is compared: its held-out records must include all of ours, or
    our held-out figures would be measured on images its model trained on.
    """
    import json

    import yaml

    run_dir = Path(run_dir)
    config_file, eval_file = run_dir / "config.yaml", run_dir / "eval.json"
    if not (config_file.is_file() and eval_file.is_file()):
        return None
    theirs = json.loads(eval_file.read_text()).get("split")
    their_source = ((yaml.safe_load(config_file.read_text()) or {}).get("data") or {}).get("source")
    if theirs is None or their_source != source or covers(theirs, split):
        return None
    return (f"{stage} holds out other images of this source than {run_dir} did ({_settings(split)} here, "
            f"{_settings(theirs)} in its eval.json), so its held-out figures would include images that model "
            "trained on; use the same data.eval_size / data.eval_fraction / data.heldout in every stage "
            "(a smaller count or fraction than upstream is safe)")


def _settings(record: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in record.items() if k not in ("count", "keys_sha256"))
