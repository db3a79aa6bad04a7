"""Helpers for benchmark scripts: describe the machine and append results to docs/benchmarks.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

__all__ = ["machine_line", "append_section", "command_line", "device_name"]


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(dev)}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def machine_line(device: str | torch.device = "cpu") -> str:
    cores = os.cpu_count()
    return (f"Machine: {platform.node() or 'unknown'}, {cores} cores, {device_name(device)}; "
            f"torch {torch.__version__}; {_dt.date.today().isoformat()}.  Command: `{command_line()}`")


def append_section(path: str | os.PathLike, title: str, body: str) -> None:
    """Append ``## title`` and ``body`` to a markdown file (created with a heading if absent)."""
    p = Path(path)
    if not p.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("# Benchmarks\n\nEvery table below was produced by the script and command shown with it.\n")
    with p.open("a") as f:
        f.write(f"\n## {title}\n\n{body}\n")
