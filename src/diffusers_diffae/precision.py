"""Choosing the compute dtype for a device.

The Python API follows diffusers: models load in float32 unless the caller passes ``torch_dtype``. The command line
(``--dtype``, default ``auto``) resolves its choice here. ``"auto"`` picks the fastest setting whose measured fidelity
holds (see docs/results/precision.md): bfloat16 on CUDA GPUs that support it and on CPUs with native bfloat16
arithmetic (AVX512-BF16 or AMX), float32 everywhere else. float16 is never chosen automatically.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

_NAMED = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_flags() -> set[str]:
    """The ``flags`` of /proc/cpuinfo (empty where the file does not exist, e.g. on macOS or Windows)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), as reported by torch or /proc/cpuinfo."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return any(flag in _cpuinfo_flags() for flag in _CPU_BF16_FLAGS)


def resolve_dtype(name: str, device: str | torch.device | None = None) -> torch.dtype:
    """Map a dtype name to a ``torch.dtype`` for ``device``.

    Args:
        name: one of ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: where the models will run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``; ``None`` means
            the CPU). Only used by ``"auto"``.

    Returns:
        The named dtype; for ``"auto"``, ``torch.bfloat16`` on a CUDA device that supports it or on a CPU with
        native bfloat16, else ``torch.float32``.

    Raises:
        ValueError: ``name`` is not one of the choices.
    """
    if name in _NAMED:
        return _NAMED[name]
    if name != "auto":
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return (
            torch.bfloat16
            if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
            else torch.float32
        )
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32
