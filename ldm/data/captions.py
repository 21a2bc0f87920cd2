"""Caption handling: pick one of an image's captions, shuffle its tags, add a prefix/suffix.

Important: caption dropout for classifier-free guidance is NOT done here. The training loop
drops captions (to the empty prompt) per step, so that cached text embeddings stay valid and
the dropout rate is a training setting, not baked into the data.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from ldm.config import require


@dataclasses.dataclass
class CaptionConfig:
    shuffle_tags: bool = False   # shuffle comma-separated tags (booru-style captions), keeping the first keep_tokens
    keep_tokens: int = 0         # leading tags that stay in place when shuffling (e.g. a trigger word)
    prefix: str = ""             # prepended to every caption (joined with separator), e.g. a trigger word
    suffix: str = ""             # appended to every caption (joined with separator)
    separator: str = ", "        # joins tags and prefix/suffix; tags are split at its stripped form (",")

    def validate(self) -> None:
        require(self.keep_tokens >= 0, f"keep_tokens must be >= 0, got {self.keep_tokens}")
        require(bool(self.separator.strip()) or not self.shuffle_tags,
                f"separator {self.separator!r} is blank, so tags cannot be split for shuffle_tags")


def process_caption(captions: Sequence[str], cfg: CaptionConfig, rng: random.Random) -> str:
    """One training caption: a random pick among `captions`, tags shuffled, prefix/suffix added.

    Empty parts are left out of the join, so an image kept with an empty caption becomes just
    the prefix and suffix (or "").
    """
    text = rng.choice(list(captions)) if captions else ""
    if cfg.shuffle_tags:
        text = cfg.separator.join(shuffle_tags(text, cfg, rng))
    return cfg.separator.join(part for part in (cfg.prefix, text, cfg.suffix) if part)


def shuffle_tags(text: str, cfg: CaptionConfig, rng: random.Random) -> list[str]:
    """The caption's tags with all but the first `keep_tokens` in random order."""
    tags = [t.strip() for t in text.split(cfg.separator.strip())]
    tags = [t for t in tags if t]
    head, tail = tags[: cfg.keep_tokens], tags[cfg.keep_tokens :]
    rng.shuffle(tail)
    return head + tail
