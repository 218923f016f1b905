"""The markdown report of benchmarks/bench_vs_official.py: row titles, the issue's goals with what bounds those not met,
the changes measured and those tried and dropped, and the tables of one run's result (its JSON)."""

from typing import List


ROW_TITLES = {
    "unet1": "UNet forward, batch 1",
    "unet8": "UNet forward, batch 8",
    "encoder8": "encoder forward, batch 8",
    "encode_decode": "encode T=10 + decode T=10, 4 images",
    "encode_decode_bf16": "encode T=10 + decode T=10, 4 images, ours in bf16 (`dtype=torch.bfloat16`)",
    "train": "training step, train_diffae.py defaults",
    "train_fp32": "training step, `--mixed_precision no`",
    "diffae_vs_baseline": "training step, DiffAE vs DDIM baseline (ours both; ratio = baseline / DiffAE)",
    "encoder_vs_baseline": "forward + backward, semantic encoder vs the DDIM baseline's UNet, defaults (ours both; "
    "ratio = baseline / encoder)",
    "without_bf16_group_norm": "training step, defaults with GroupNorm32 casting bf16 to fp32 and back vs the "
    "defaults (ours both; ratio = casts / defaults)",
    "without_lerp_ema": "training step, defaults with diffusers' two-pass EMA update vs the defaults (ours both; "
    "ratio = two-pass / defaults)",
}


CLOCKS = {"wall": "wall-clock seconds", "cpu": "CPU seconds of the benchmark process (one thread: the time not "
          "spent waiting for other jobs)"}  # fmt: skip
# Changes to this project's code that the rows measure (the official code is unmodified).
CHANGES = [
    "attention blocks return activations in their input's memory layout (diffusers' `Attention` hands back a "
    "channels-last view, which made every later convolution with contiguous weights convert its input, output and "
    "weight gradient: the largest `aten::copy_` share in the 64 px training profile)",
    "the time and z_sem modulation of each residual block is one `addcmul` over the feature map instead of three "
    "passes; GroupNorm32 skips its casts for fp32 input",
    "training: torch's fused Adam (one kernel instead of a per-parameter loop on a CPU), the contiguous layout "
    "(channels_last measured slower for training), bf16 autocast with fp32 weights on CPUs with native bf16 "
    "(`--mixed_precision no` for fp32)",
    "training under bf16 autocast on a CPU: GroupNorm32 hands contiguous bf16 input to the CPU's mixed-precision group-norm kernel (fp32 statistics) instead of casting the "
    "feature map to fp32 and back; the EMA update is one `torch._foreach_lerp_` pass instead of diffusers' two passes "
    "through a temporary copy of every weight (rows `without_*` below undo each in the same run)",
]
# Tried and dropped: measured by separate interleaved A/B runs (one thread, CPU time) on the CPU of this report on
# 2026-12-06, not re-run by this script.
DROPPED = [
    "`torch.compile` (inductor) of the training module (UNet and encoder, forward and backward): the first step took "
    "320 s (32 px) and 665 s (64 px) of wall time to compile, and the compiled step was then 1.09x (32 px, bf16), "
    "0.98x (32 px, fp32) and 0.85x (64 px, bf16) the speed of eager: no `--compile` option (accelerate's "
    "`--dynamo_backend` remains for other hardware)",
    "dropout masks drawn with `torch.rand` instead of `bernoulli_` (torch's per-element generator on AMD CPUs, "
    "`aten::bernoulli_` in the profiles; the official code pays the same): 1.03x (bf16) and 1.00x (fp32) at 32 px, "
    "not worth a hand-written dropout",
    "the channels-last layout for bf16 training: 0.56x (32 px) and 0.85x (64 px) the speed of contiguous",
    "the encoder in fp32 inside the bf16 step: its forward + backward 1.44x slower at 64 px, the same at 32 px",
    "reshape-mean and adaptive pooling for the 2x2 down-sampling: slower than `avg_pool2d` forward + backward",
    "attention through diffusers' `AttnProcessor` (batched matmuls, softmax in fp32) instead of PyTorch's fused SDPA "
    "kernel under bf16 autocast: 1.4-2.3x faster attention alone, but the whole training step only 1.00-1.02x faster "
    "(a run of this benchmark, and A/B runs of 15-31 interleaved rounds)",
    "data-loader workers: the in-memory image cache serves a batch of 16 at 32 px in about 0.5 ms, about 0.2% of a "
    "step, so there is nothing to overlap; `--dataloader_num_workers` stays for images decoded on the fly",
]


def goals(result: dict) -> List[str]:
    """The issue's goals, each with the measured ratio and whether it holds."""
    archs = result["architectures"]

    def ratio(arch, row, invert=False):
        s = archs.get(arch, {}).get("timings", {}).get(row)
        return None if s is None else (1 / s["ratio"] if invert else s["ratio"])

    checks = [
        ("training step, train_diffae.py defaults, >= 1.5x official at ffhq64_autoenc", ratio("ffhq64_autoenc", "train"), 1.5, True),
        ("training step, defaults, >= 1.5x official at 32 px", ratio("fixture32", "train"), 1.5, True),
        ("training step in fp32, >= 1.5x official at ffhq64_autoenc", ratio("ffhq64_autoenc", "train_fp32"), 1.5, True),
        ("encode + decode T=10+10 in fp32, >= 1.5x official at 64 px", ratio("ffhq64_autoenc", "encode_decode"), 1.5, True),
        ("encode + decode T=10+10 in bf16, >= 1.5x official at 64 px", ratio("ffhq64_autoenc", "encode_decode_bf16"), 1.5, True),
        ("DiffAE / DDIM baseline training time <= 1.15 at ffhq64_autoenc", ratio("ffhq64_autoenc", "diffae_vs_baseline", True), 1.15, False),
        ("DiffAE / DDIM baseline training time <= 1.15 at 32 px", ratio("fixture32", "diffae_vs_baseline", True), 1.15, False),
    ]  # fmt: skip
    lines = ["## Goals", "", "| goal | measured | met |", "| --- | --- | --- |"]
    for text, value, bound, at_least in checks:
        if value is not None:
            met = value >= bound if at_least else value <= bound
            lines.append(f"| {text} | {value:.2f} | {'yes' if met else 'no'} |")
    conv = {k: sum(r["share"] for r in table if "conv" in r["op"]) for k, table in result.get("profile", {}).items()}
    if conv:
        shares = ", ".join(f"{100 * v:.0f}% of the {k}" for k, v in conv.items())
        lines += ["", f"What bounds the fp32 ratios: convolutions (forward and backward) take {shares} in our code "
                  "(profiles below), and they are the same convolutions as the official code's; bf16 on a CPU with "
                  "native bf16 is what makes them cheaper."]  # fmt: skip
    small = ratio("fixture32", "train"), ratio("fixture32", "train_fp32")
    if all(small):
        lines += ["", f"What bounds the 32 px training ratio: bf16 autocast gains only {small[0] / small[1]:.2f}x over fp32 "
                  "there (the fixture's convolutions have 32-64 channels, too narrow for bf16 to repay the casts of "
                  "weights and activations), and the rest of the step is spread over attention, dropout's random "
                  "numbers (`aten::bernoulli_`) and small ops (profile below)."]  # fmt: skip
    bounds = []
    for arch, entry in archs.items():
        base, encoder = ratio(arch, "diffae_vs_baseline", True), ratio(arch, "encoder_vs_baseline", True)
        if entry.get("diffae_flop_ratio") and base and encoder:
            bounds.append(f"{arch}: {entry['diffae_flop_ratio']:.2f}x the FLOPs, {base:.2f}x the time, the encoder's "
                          f"forward + backward {encoder:.2f}x the baseline UNet's time")  # fmt: skip
    if bounds:
        lines += ["", "What bounds the DiffAE / DDIM ratio: DiffAE's step adds the encoder's forward and backward to the "
                  f"baseline's ({'; '.join(bounds)}). The encoder's time share exceeds its FLOP share: its deepest "
                  "levels run on 8x8 and 4x4 maps, where per-call costs and the bf16 casts of its weights weigh more "
                  "than the arithmetic, and its weights (a fifth of the parameters at 64 px) add to the gradient "
                  "clipping, Adam and EMA passes of every step."]  # fmt: skip
    lines += ["", "Changes to this project's code measured here:", "", *[f"- {c}" for c in CHANGES]]
    lines += ["", "Tried and dropped:", "", *[f"- {c}" for c in DROPPED]]
    return lines


def loads(values) -> str:
    """Load averages over 1, 5 and 15 minutes, as `uptime` prints them."""
    return "unknown" if values is None else ", ".join(f"{v:.2f}" for v in values)


def markdown(result: dict) -> str:
    m = result["machine"]
    bf16 = [flag for flag in ("avx512_bf16", "amx_bf16") if m["bf16_hardware"].get(flag)]
    clock = result.get("clock", "cpu" if "--clock cpu" in result["command"] else "wall")
    lines = [
        "# Speed against the official code",
        "",
        f"Measured by `{result['command']}` on {result['date']} in {result['seconds']:.0f} s.",
        "",
        f"CPU: {m['cpu']} ({m.get('cpus', '?')} CPUs, bf16 instructions: {bf16 or 'none'}), "
        f"{m['threads']} threads, torch {m['torch']}; load average at start {loads(m['load_average_at_start'])}, at "
        f"end {loads(result['load_average_at_end'])}. Times are {CLOCKS[clock]}. Ratio = official time / our time (> 1: this "
        "project is faster), median over rounds with the two timed in turns, and its range over the rounds.",
        "",
        *goals(result),
        "",
        "## All rows",
        "",
        "| architecture | work | official (s) | ours (s) | ratio | range | ratio of best times |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, entry in result["architectures"].items():
        for row, s in entry["timings"].items():
            title = ROW_TITLES[row] + (
                f", batch {entry['train_batch']}"
                if row.startswith(("train", "diffae", "encoder_vs", "without"))
                else ""
            )
            lines.append(
                f"| {arch} | {title} | {s['official_s']:.4f} | {s['ours_s']:.4f} | **{s['ratio']:.2f}** | "
                f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f} | {s['ratio_of_best']:.2f} |"
            )
    lines += ["", "Parity checked before timing (one forward, relative max error; parameters):", ""]
    for arch, entry in result["architectures"].items():
        p = entry["parity"]
        errors = ", ".join(f"{k} {v:.1e}" for k, v in p["relative_max_error"].items())
        lines.append(f"- {arch}: {p['parameters']:,} parameters in both; {errors}")
    curves = result.get("loss_curves")
    if curves:
        lines += [
            "",
            f"## Loss curves, fp32 vs bf16 autocast ({curves['steps']} steps of batch {curves['batch']} from "
            f"`{curves['data']}`, fixture32 architecture, same weights, batches, noise and timesteps; mean loss per "
            f"{curves['window']} steps)",
            "",
            "| steps | fp32 | bf16 | bf16 / fp32 |",
            "| --- | --- | --- | --- |",
        ]
        for i, (a, b) in enumerate(zip(curves["loss"]["fp32"], curves["loss"]["bf16"])):
            lines.append(f"| {i * curves['window']}-{(i + 1) * curves['window']} | {a:.4f} | {b:.4f} | {b / a:.3f} |")
    if result.get("profile"):
        lines += ["", "## Profile of this project's code (share of self CPU time per op, 3 calls)", ""]
        for key, table in result["profile"].items():
            ops = ", ".join(f"`{r['op']}` {100 * r['share']:.0f}%" for r in table[:8])
            lines.append(f"- {key}: {ops}")
    return "\n".join(lines) + "\n"
