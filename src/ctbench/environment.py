"""What a run or a phase ran with: versions, the source's git commit, threads, host."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import __version__


def environment() -> dict[str, Any]:
    """ctbench, torch and Python versions, torch CPU threads, host, CPU, git commit, CUDA version."""
    return {"ctbench": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "host": platform.node(), "cpu": cpu_name(),
            "git_commit": git_commit(), "cuda": torch.version.cuda if torch.cuda.is_available() else None}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the git checkout ctbench runs from, or None; see `source_commit`."""
    return source_commit(Path(__file__).parent)


def source_commit(source: Path) -> str | None:
    """HEAD of the checkout holding `source`, with "+dirty" when files under `source` differ from it.

    Only the code's own folder counts: a checkout whose results or notes are being rewritten
    (as a benchmark's results pages are, before its report) still runs the committed code.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=source,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
