"""What the benchmark scripts share: device synchronisation and the report they print."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(figures: dict, summary: str | None, json_path: str | None) -> dict:
    """Print the figures (JSON, then a one-line summary) and write them to `json_path` if given."""
    text = json.dumps(figures, indent=1)
    print(text)
    if summary:
        print(summary)
    if json_path:
        Path(json_path).write_text(text)
    return figures
