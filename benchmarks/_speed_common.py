"""What the speed benchmarks share: the presets' configurations, the interleaved timer, FLOP counting, the
description of the machine and the Markdown helpers of the reports (imported by `bench_speed.py`, which re-exports
`interleaved` and `machine` for the other benchmarks)."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_diffae import preset_config


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every preset here samples with the official DDIM configuration: linear betas, 1000 steps, x0 clipped.
SCHEDULER = preset_config("ffhq64", "scheduler")


def preset_configs(name: str) -> Dict[str, dict]:
    """UNet and encoder configs of a preset: `emoji32` (the bundled model, `training/configs/emoji32.json`) or an
    official one (`ffhq64`, `ffhq128`, `ffhq256`, ...)."""
    if name == "emoji32":
        with open(os.path.join(REPO_ROOT, "training", "configs", "emoji32.json"), encoding="utf-8") as f:
            configs = json.load(f)
        return {"unet": configs["unet"], "encoder": configs["encoder"]}
    return {"unet": preset_config(name, "unet"), "encoder": preset_config(name, "encoder")}


# 1. Timing


def interleaved(
    fns: Dict[str, Callable], repeat: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter
) -> Dict[str, List[float]]:
    """The times of each function over `repeat` rounds, the functions called in turns within a round (a, b, a, b,
    ...) so that load from other jobs on a shared machine hits every variant alike and their ratios stay meaningful.
    `clock` is wall time, or with `time.process_time` the CPU time of this process: with one thread, the time not
    spent waiting for other jobs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


# The clock of `timed`: wall time, or `time.process_time` (`bench_speed.py --clock cpu`): with one thread, the CPU
# time of this process, which other jobs on a shared machine do not inflate.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"name": "wall"}


def timed(fns: Dict[str, Callable], warmup: int = 1, repeat: int = 2) -> Dict[str, Dict[str, float]]:
    """Median and best time of each function on the chosen clock (`CLOCK`), timed in turns by `interleaved`."""
    times = interleaved(fns, repeat, warmup, clock=CLOCKS[CLOCK["name"]])
    return {name: {"median_s": statistics.median(t), "best_s": min(t), "runs": len(t)} for name, t in times.items()}


def timed_once(fn: Callable) -> float:
    return timed({"": fn}, warmup=0, repeat=1)[""]["median_s"]


def with_ratios(times: Dict[str, Dict[str, float]], reference: str = "fp32") -> Dict[str, Dict[str, float]]:
    """`times` with each variant's speed-up over `reference` (its time / the variant's), from medians and bests."""
    ref = times[reference]
    return {
        v: {**t, "speedup_median": ref["median_s"] / t["median_s"], "speedup_best": ref["best_s"] / t["best_s"]}
        for v, t in times.items()
    }


def count_flops(fn: Callable) -> int:
    """FLOPs of one call (torch's counter: 2 per multiply-add of matmuls and convolutions)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_rate(device: str, dtype: torch.dtype, size: int = 2048, repeat: int = 5) -> Dict[str, float]:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    t = timed({"mm": lambda: a @ b}, repeat=repeat)["mm"]
    flops = 2 * size**3
    return {"median_gflops": flops / t["median_s"] / 1e9, "best_gflops": flops / t["best_s"] / 1e9}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def n_params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def load_average():
    return tuple(round(v, 2) for v in os.getloadavg()) if hasattr(os, "getloadavg") else None


# 2. Machine


def machine(device: str) -> Dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_at_start": load_average(),
        "cpu": platform.processor(),
        "bf16_hardware": {},
    }
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
        flags = set(fields.get("Flags", "").split())
        info.update(
            cpu=fields.get("Model name"),
            cpus=fields.get("CPU(s)"),
            cpu_family_model_stepping=f"{fields.get('CPU family')}/{fields.get('Model')}/{fields.get('Stepping')}",
            hypervisor=fields.get("Hypervisor vendor"),
            bf16_hardware={f: f in flags for f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")},
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["native_bf16"] = torch.cuda.is_bf16_supported()
    else:  # dedicated bf16 instructions; elsewhere bf16 is emulated and slower than fp32
        info["native_bf16"] = any(info["bf16_hardware"].get(f) for f in ("avx512_bf16", "amx_bf16"))
    return info


# 3. Reports


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and abs(v) < 1e-2 else f"{v:.{digits}f}"
    return str(v)


def table(header: str, rows: List[List[str]]) -> List[str]:
    """A Markdown table; `header` names the columns separated by " | "."""
    lines = [f"| {header} |", "|" + "---|" * len(header.split(" | "))]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def write_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file, so a killed run never leaves half a report."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
