"""Where a result came from: the command and the machine, recorded in every results file."""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch


def command_line() -> str:
    """The command as a person would type it again: ``python -m <module> ...`` for a module run,
    else the program without its install path (``feddmmr train-central ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        program = f"python -m {spec.name.removesuffix('.__main__')}"
    elif sys.argv[0].endswith(".py"):
        program = f"python {os.path.relpath(sys.argv[0])}"
    else:
        program = Path(sys.argv[0]).name
    return " ".join([program, *(shlex.quote(a) for a in sys.argv[1:])])


def machine_description() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
