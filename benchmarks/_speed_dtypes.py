"""The compute dtypes and layouts of `bench_speed.py`, as users load them: `from_pretrained(torch_dtype=...)` in
fp32, bf16 and fp16, bf16 autocast over fp32 weights, contiguous or channels_last, timed in turns in one run.

- CPU: `pipe.encode` (T=10) + `pipe.decode` (T=10) of 4 images at 32 px (`emoji32`) and 64 px (`ffhq64`); fp16
  (emulated on CPUs without AVX512-FP16 / AMX-FP16) one run against fp32; a torch.profiler breakdown by operator
  of the 32 px run in fp32 and bf16; the 256 px edit (FFHQ-256 architecture, encode T=20 + decode T=20, one image),
  extrapolated from timed encoder and UNet calls and checked by a real T=2+2 run.
- CUDA: encode T=20 + decode T=20 of a batch of 8 at 128 px (`ffhq128`) and 256 px (`ffhq256`) in fp32, fp16,
  bf16, and bf16 with `torch.compile` of the UNet.

Random weights: speed does not depend on them (fidelity is measured on trained weights by `bench_precision.py`).
"""

import contextlib
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from _speed_common import (
    SCHEDULER,
    count_flops,
    fmt,
    n_params,
    preset_configs,
    synchronize,
    table,
    timed,
    timed_once,
    with_ratios,
)
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0

from diffusers_diffae import DiffAEInverseScheduler, DiffAEPipeline, DiffAEUNet2DModel, SemanticEncoder


# name -> how the pipeline is loaded and run. layout None: the one `from_pretrained` picks (channels_last for half
# precision and from 64 px up); sdpa_attention: diffusers' `AttnProcessor2_0` (PyTorch's fused SDPA) instead of the
# default `DiffAEAttnProcessor`, which runs half precision on a CPU through diffusers' `AttnProcessor` (batched bmm).
VARIANTS = {
    "fp32": dict(dtype=torch.float32, layout="contiguous"),
    "fp32 channels_last": dict(dtype=torch.float32, layout="channels_last"),
    "bf16": dict(dtype=torch.bfloat16),
    "bf16 contiguous": dict(dtype=torch.bfloat16, layout="contiguous"),
    "bf16 autocast": dict(dtype=torch.float32, autocast=True),
    "bf16 + SDPA attention": dict(dtype=torch.bfloat16, sdpa_attention=True),
    "fp16": dict(dtype=torch.float16),
}
CPU_ROWS = {  # per preset, the variants timed in turns (fp16 is timed apart: one run, it is slow without hardware)
    "emoji32": ["fp32", "fp32 channels_last", "bf16", "bf16 contiguous", "bf16 autocast", "bf16 + SDPA attention"],
    "ffhq64": ["fp32", "fp32 channels_last", "bf16", "bf16 autocast"],
}
EDIT_ROWS = ["fp32", "fp32 channels_last", "bf16", "bf16 autocast"]
PROFILED = ["fp32", "bf16", "bf16 contiguous"]


def save_random_pipeline(preset: str, folder: str) -> None:
    """A pipeline of the preset's architecture with random weights, saved so that `torch_dtype` loads it."""
    configs = preset_configs(preset)
    torch.manual_seed(0)
    pipe = DiffAEPipeline(
        unet=DiffAEUNet2DModel.from_config(configs["unet"]).eval(),
        encoder=SemanticEncoder.from_config(configs["encoder"]).eval(),
        scheduler=DDIMScheduler.from_config(SCHEDULER),
        inverse_scheduler=DiffAEInverseScheduler.from_config(SCHEDULER),
    )
    pipe.save_pretrained(folder)


def load(folder: str, variant: str, device: str) -> DiffAEPipeline:
    spec = VARIANTS[variant]
    pipe = DiffAEPipeline.from_pretrained(folder, torch_dtype=spec["dtype"]).to(device)
    if spec.get("layout"):
        pipe.set_memory_format(torch.channels_last if spec["layout"] == "channels_last" else torch.contiguous_format)
    if spec.get("sdpa_attention"):
        for model in (pipe.unet, pipe.encoder):
            model.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_all(preset: str, variants: List[str], device: str) -> Dict[str, DiffAEPipeline]:
    with tempfile.TemporaryDirectory() as folder:
        save_random_pipeline(preset, folder)
        return {v: load(folder, v, device) for v in variants}


def compute(variant: str, device: str):
    if not VARIANTS[variant].get("autocast"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def edit_fn(pipe: DiffAEPipeline, images: torch.Tensor, steps: int, variant: str, device: str) -> Callable:
    """`pipe.encode` (encoder + `steps` inversion calls) and `pipe.decode` (`steps` calls) of `images`."""

    def run():
        with compute(variant, device):
            latents = pipe.encode(images, num_inference_steps=steps, chunk_size=len(images))
            pipe.decode(latents.z_sem, latents.x_T, steps, output_type="pt", chunk_size=len(images))
        synchronize(device)

    return run


def profile_ops(fns: Dict[str, Callable], top: int = 10) -> Dict:
    """Self CPU time (ms) and calls of each operator in one run of each function (torch.profiler), the `top`
    operators by their summed time, the rest as "other"."""
    from torch.profiler import ProfilerActivity, profile

    per_variant = {}
    for name, fn in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        per_variant[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    ops = {op for ops in per_variant.values() for op in ops}
    ranked = sorted(ops, key=lambda op: -sum(v.get(op, (0, 0))[0] for v in per_variant.values()))
    out = {"ops": ranked[:top], "variants": {}}
    for name, ops_ in per_variant.items():
        rows = {op: {"ms": ops_.get(op, (0.0, 0))[0], "calls": ops_.get(op, (0.0, 0))[1]} for op in ranked[:top]}
        rows["other"] = {"ms": sum(ms for op, (ms, _) in ops_.items() if op not in ranked[:top]), "calls": None}
        rows["total"] = {"ms": sum(ms for ms, _ in ops_.values()), "calls": sum(n for _, n in ops_.values())}
        out["variants"][name] = rows
    return out


def bench_cpu(log, repeat: int, presets: List[str], done: Callable[[Dict], None]) -> Dict:
    result = {}
    for preset in [p for p in presets if p in CPU_ROWS]:
        pipes = load_all(preset, CPU_ROWS[preset] + ["fp16"], "cpu")
        size = pipes["fp32"].resolution
        images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(0))
        fns = {v: edit_fn(pipe, images, 10, v, "cpu") for v, pipe in pipes.items()}
        log(f"{preset}: encode T=10 + decode T=10 of 4 images, {', '.join(CPU_ROWS[preset])} in turns")
        rows = timed({v: fns[v] for v in CPU_ROWS[preset]}, warmup=1, repeat=repeat)
        result[preset] = with_ratios(rows)
        result[f"{preset}_vs_channels_last"] = with_ratios(rows, "fp32 channels_last")
        log(f"{preset}: the same in fp16, one run in turns with fp32")
        result[f"{preset}_fp16"] = with_ratios(timed({v: fns[v] for v in ("fp32", "fp16")}, warmup=0, repeat=1))
        if preset == "emoji32":
            log("emoji32: torch.profiler of one encode + decode per variant")
            result["emoji32_profile"] = profile_ops({v: fns[v] for v in PROFILED})
        done(result)
    if "ffhq256" in presets:
        result["ffhq256_edit"] = bench_edit_256(log)
        done(result)
    return result


def bench_edit_256(log, steps: int = 20) -> Dict:
    """Editing one 256x256 photo with the FFHQ-256 architecture: encode (encoder + T inversion calls) + decode (T
    calls), extrapolated from each variant's timed encoder and UNet calls (the DDIM arithmetic between calls is
    negligible) and checked by a real T=2+2 run of the fastest variant."""
    pipes = load_all("ffhq256", EDIT_ROWS, "cpu")
    fp32 = pipes["fp32"]
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z, t = torch.randn(1, fp32.unet.config.z_sem_channels), torch.tensor([500])

    def forward(pipe, variant, encoder):
        def run():
            with torch.inference_mode(), compute(variant, "cpu"):
                dtype = pipe.unet.dtype
                pipe.encoder(x.to(dtype)) if encoder else pipe.unet(x.to(dtype), t, z.to(dtype))

        return run

    gflop_unet = count_flops(forward(fp32, "fp32", False)) / 1e9
    out = {
        "params_M": n_params(fp32.unet) + n_params(fp32.encoder),
        "gflop_unet_forward": gflop_unet,
        # However well the kernels run, 41 calls cannot beat the machine's fp32 matmul rate.
        "gflop_edit": 2 * steps * gflop_unet + count_flops(forward(fp32, "fp32", True)) / 1e9,
        "steps": steps,
    }
    log(f"ffhq256: one encoder call and one UNet call per variant ({', '.join(EDIT_ROWS)}), in turns")
    enc = timed({v: forward(p, v, True) for v, p in pipes.items()}, warmup=1, repeat=1)
    unet = timed({v: forward(p, v, False) for v, p in pipes.items()}, warmup=1, repeat=2)
    edit = {
        v: {
            "unet_forward_s": unet[v]["median_s"],
            "encoder_forward_s": enc[v]["median_s"],
            "median_s": enc[v]["median_s"] + 2 * steps * unet[v]["median_s"],
            "best_s": enc[v]["best_s"] + 2 * steps * unet[v]["best_s"],
        }
        for v in pipes
    }
    out["rows"] = with_ratios(edit)
    out["fastest"] = fastest = min(edit, key=lambda v: edit[v]["median_s"])
    log(f"ffhq256: end-to-end check with T=2+2 ({fastest})")
    real = timed_once(edit_fn(pipes[fastest], (x + 1) / 2, 2, fastest, "cpu"))
    predicted = edit[fastest]["encoder_forward_s"] + 4 * edit[fastest]["unet_forward_s"]
    out["check_T2"] = {"measured_s": real, "extrapolated_s": predicted, "ratio": real / predicted}
    return out


def bench_cuda(log, repeat: int, presets: List[str], done: Callable[[Dict], None]) -> Dict:
    result = {}
    for preset in presets:
        with tempfile.TemporaryDirectory() as folder:
            save_random_pipeline(preset, folder)
            pipes = {v: load(folder, v, "cuda") for v in ("fp32", "fp16", "bf16")}
            pipes["bf16 + compile"] = load(folder, "bf16", "cuda")
        pipes["bf16 + compile"].unet.compile()  # in place: the pipeline keeps its registered UNet
        size = pipes["fp32"].resolution
        images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0)).cuda()
        fns = {v: edit_fn(pipe, images, 20, v.split(" +")[0], "cuda") for v, pipe in pipes.items()}
        log(f"{preset}: compiling, then encode T=20 + decode T=20 of 8 images in turns")
        start = time.perf_counter()
        fns["bf16 + compile"]()
        compile_s = time.perf_counter() - start
        result[preset] = with_ratios(timed(fns, warmup=1, repeat=repeat))
        result[preset]["bf16 + compile"]["first_call_s"] = compile_s
        done(result)
    return result


# Report

TITLES = {
    "emoji32": "32 px (`emoji32`): encode T=10 + decode T=10, 4 images",
    "ffhq64": "64 px (`ffhq64`): encode T=10 + decode T=10, 4 images",
    "ffhq128": "GPU, 128 px (`ffhq128`): encode T=20 + decode T=20, batch 8",
    "ffhq256": "GPU, 256 px (`ffhq256`): encode T=20 + decode T=20, batch 8",
}


def speed_table(rows: Dict, against: Optional[Dict] = None, against_name: str = "") -> List[str]:
    header = "variant | median s | best s | speed-up over fp32 (median) | speed-up (best)"
    if against:
        header += f" | over {against_name} (median)"
    lines = []
    for v, r in rows.items():
        cells = [v, fmt(r["median_s"]), fmt(r["best_s"]), fmt(r["speedup_median"]), fmt(r["speedup_best"])]
        lines.append(cells + ([fmt(against[v]["speedup_median"])] if against else []))
    return table(header, lines)


def profile_table(profile: Dict) -> List[str]:
    names = list(profile["variants"])
    header = "operator | " + " | ".join(f"{v} ms (calls)" for v in names) + " | bf16 / fp32 time"
    rows = []
    for op in profile["ops"] + ["other", "total"]:
        cells = [op]
        for v in names:
            r = profile["variants"][v][op]
            cells.append(f"{r['ms']:.0f}" + (f" ({r['calls']})" if r["calls"] is not None else ""))
        fp32, bf16 = profile["variants"]["fp32"][op]["ms"], profile["variants"]["bf16"][op]["ms"]
        rows.append(cells + [fmt(bf16 / fp32) if fp32 else "–"])
    return table(header, rows)


def report(rows: Dict, device: str, peak: Optional[Dict] = None) -> List[str]:
    """The Markdown sections of the dtype rows of speed.md."""
    lines = []
    if device == "cuda":
        lines += ["## GPU (`--device cuda`): fp32, fp16, bf16 and torch.compile", ""]
        for key in ("ffhq128", "ffhq256"):
            if key in rows:
                lines += [f"### {TITLES[key]}", ""] + speed_table(rows[key])
                lines += [
                    f"First call of the compiled UNet (compilation): {rows[key]['bf16 + compile']['first_call_s']:.0f} s.",
                    "",
                ]
        return lines
    lines += [
        "## Precision and layout: encode + decode through `from_pretrained(torch_dtype=...)`",
        "",
        "Timed in turns in one run. `fp32` is the official contiguous layout (what `from_pretrained` gives a 32 px "
        "fp32 model), `bf16` is `torch_dtype=torch.bfloat16` in the layout `from_pretrained` gives half precision "
        "(channels_last) with the default attention processor (on a CPU diffusers' batched-matmul `AttnProcessor` for "
        "half precision), `bf16 autocast` fp32 weights under `torch.autocast`, `bf16 + SDPA attention` the bf16 "
        "pipeline with diffusers' `AttnProcessor2_0` (fused SDPA) instead. Speed-up = fp32 time / variant time.",
        "",
    ]
    for key in ("emoji32", "ffhq64"):
        if key not in rows:
            continue
        lines += [f"### {TITLES[key]}", ""]
        lines += speed_table(rows[key], rows[f"{key}_vs_channels_last"], "fp32 channels_last")
        fp16 = rows[f"{key}_fp16"]
        lines += [
            f"fp16 (one run, in turns with fp32): {fp16['fp16']['median_s']:.1f} s against {fp16['fp32']['median_s']:.2f} "
            f"s, speed-up {fp16['fp16']['speedup_median']:.2f} (no fp16 arithmetic on this CPU: it is emulated).",
            "",
        ]
    if "emoji32_profile" in rows:
        lines += [
            "### What bounds bf16 at 32 px: torch.profiler, one encode + decode (32 px, 4 images, T=10+10)",
            "",
            "Self CPU time by operator (the operators with the most time summed over the variants). At 32 px "
            "each network call holds a few hundred small operators, so per-operator costs (the float32 GroupNorm "
            "on channels-last input, SiLU, the small time / z_sem linears) weigh against the convolutions that bf16 "
            "speeds up. (PyTorch's fused SDPA kernel, which fp32 uses, runs bf16 no faster than fp32 at 256 tokens, "
            "so half precision on a CPU attends through batched matmuls: the `mm` rows.)",
            "",
        ]
        lines += profile_table(rows["emoji32_profile"])
    if "ffhq256_edit" in rows:
        h, edit = rows["ffhq256_edit"], rows["ffhq256_edit"]["rows"]
        check = h["check_T2"]
        lines += [
            f"## Editing one 256x256 photo (FFHQ-256 architecture, random weights): encode T={h['steps']} + decode "
            f"T={h['steps']}",
            "",
            f"41 network calls; {h['params_M']:.0f} M parameters, UNet forward {h['gflop_unet_forward']:.0f} GFLOP. "
            "Extrapolated from one timed encoder call and timed UNet calls per variant (checked with a real T=2+2 "
            f"run of `{h['fastest']}`: measured {check['measured_s']:.1f} s vs extrapolated "
            f"{check['extrapolated_s']:.1f} s, ratio {check['ratio']:.2f}). fp32 is the plain contiguous layout; "
            "the others are in channels_last, the layout `from_pretrained` gives at 256 px.",
            "",
        ]
        header = (
            "variant | UNet forward (s) | encoder (s) | edit (s, extrapolated) | speed-up over fp32 (median) | (best)"
        )
        keys = [("unet_forward_s", 2), ("encoder_forward_s", 2), ("median_s", 0), ("speedup_median", 2)]
        lines += table(
            header, [[v] + [fmt(r[k], d) for k, d in keys] + [fmt(r["speedup_best"])] for v, r in edit.items()]
        )
        if peak:
            fp32_peak, bf16_peak = peak["fp32"]["best_gflops"], peak["bf16"]["best_gflops"]
            lines += [
                f"Lower bound: the edit is {h['gflop_edit'] / 1e3:.1f} TFLOP, {h['gflop_edit'] / fp32_peak:.0f} s at the "
                f"best measured fp32 matmul rate ({fp32_peak:.0f} GFLOP/s), {h['gflop_edit'] / bf16_peak:.0f} s at the "
                f"bf16 rate ({bf16_peak:.0f} GFLOP/s).",
                "",
            ]
    return lines
