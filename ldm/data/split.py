"""Which records are held out: a stable hash of each record's key, never its position.

Real folders are sorted by name, date or category, so "the last N records" is often a single
kind. Here a record is held out by a hash of its key (file name relative to the source root, or a
tar member's `__key__`): the same on every machine, in every run, whatever the order of the
records and the number of processes, and no key is in both splits.
"""

from __future__ import annotations

import hashlib

SPLIT_RULE = "sha256-v1"  # recorded beside every held-out figure; change it only with a new name


def key_hash(key: str) -> float:
    """A number in [0, 1) fixed by `key` alone (the first 64 bits of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def heldout_by_count(keys, count: int) -> set[str]:
    """The `count` keys with the smallest hashes: a uniform random subset fixed by the keys alone."""
    return set(sorted(set(keys), key=lambda k: (key_hash(k), k))[:count])


def is_heldout(key: str, fraction: float) -> bool:
    """For a stream whose length is unknown: held out when the key's hash falls below `fraction`."""
    return key_hash(key) < fraction
