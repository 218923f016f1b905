"""Writes an evaluation's results as JSON, a Markdown report, a quality-vs-T plot and a reconstruction grid."""

import json
import math
import os
from typing import Dict, List, Optional

import torch

from ..image_utils import image_grid


# The probes that judge edits, by the space they read (see `Evaluation.manipulation`), and their names in the report.
JUDGE_NAMES = {"pixels": "pixel", "z_sem": "z_sem", "features": "feature"}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value.replace("|", "\\|")  # a bare pipe would end the Markdown table cell
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            return f"{value:.2e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: List[str], rows: List[List]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _by_model_and_T(rows: List[Dict], key: str):
    models = list(dict.fromkeys(r["model"] for r in rows))
    steps = sorted({r["T"] for r in rows})
    lookup = {(r["model"], r["T"]): r.get(key) for r in rows}
    return models, steps, lookup


def _model_by_T_table(rows: List[Dict], key: str) -> List[str]:
    """A table of `key` with one line per model and one column per T."""
    models, steps, lookup = _by_model_and_T(rows, key)
    return _table(["model"] + [f"T={T}" for T in steps], [[m] + [lookup.get((m, T)) for T in steps] for m in models])


def _reconstruction(rec: Dict, results: Dict, plot_name: Optional[str], grid_name: Optional[str]) -> List[str]:
    lines = [f"{rec['num_images']} images of split `{results.get('split')}`. {rec['protocol']}.", ""]
    if rec.get("lpips") != "computed":
        lines += [f"LPIPS: {rec.get('lpips')}.", ""]
    if rec.get("baseline") != "evaluated":
        lines += [f"DDIM baseline: {rec.get('baseline')}.", ""]
    metrics = ["ssim", "ssim_official", "psnr", "mse"] + (["lpips"] if rec.get("lpips") == "computed" else [])
    for key in metrics:
        if not any(key in row for row in rec["rows"]):  # reports written before SSIM_OFFICIAL existed
            continue
        lines += [f"**{key.upper()}**", ""] + _model_by_T_table(rec["rows"], key)
    kept = rec.get("attributes_kept", {})
    if "skipped" in kept:
        lines += [f"Attributes kept: {kept['skipped']}.", ""]
    elif kept:
        names = list(kept["input_auroc"])
        lines += [f"**Attributes kept** (pixel-probe AUROC). {kept['protocol']}.", ""]
        lines += _table(
            ["images", "T"] + names,
            [["test inputs", "–"] + [kept["input_auroc"][a] for a in names]]
            + [[r["model"], r["T"]] + [r["auroc"].get(a) for a in names] for r in kept["rows"]],
        )
    if plot_name:
        lines += [f"![quality vs T]({plot_name})", ""]
    if grid_name:
        lines += [f"![reconstructions]({grid_name})", ""]
    return lines


def _representation(rep: Dict, results: Dict) -> List[str]:
    lines = [f"{rep['num_images']} images of split `{results.get('split')}`. {rep['protocol']}.", ""]
    spaces = list(rep["mean"]) or ["z_sem", "x_T", "pixels"]
    rows = []
    for name, entry in rep["attributes"].items():
        counts = f"{entry['positives']}/{entry['negatives']}"
        if "skipped" in entry:
            rows.append([name, counts, entry.get("skipped")] + [None] * (len(spaces) - 1))
        else:
            rows.append([name, counts] + [entry.get(s) for s in spaces])
    if rep["mean"]:
        rows.append(["**mean**", ""] + [rep["mean"][s] for s in spaces])
    lines += _table(["attribute", "pos/neg"] + spaces, rows)
    if rep.get("held_out"):
        lines += [
            f"Probes fitted on {rep['num_probe_train_images']} images of the other split, AUROC on the test images:",
            "",
        ]
        lines += _table(
            ["attribute", "z_sem", "pixels"], [[a, v["z_sem"], v["pixels"]] for a, v in rep["held_out"].items()]
        )
    return lines


def _interpolation(interp: Dict, results: Dict) -> List[str]:
    lines = [f"{interp['num_pairs']} pairs, T={interp['T']}, epsilon={interp['epsilon']}. {interp['protocol']}.", ""]
    lines += ["Distances: " + "; ".join(f"`{k}`: {v}" for k, v in interp["distance_spaces"].items()) + ".", ""]
    if interp.get("feature_space_note"):
        lines += [f"Inception features: {interp['feature_space_note']}.", ""]
    spaces = list(interp["distance_spaces"])
    return lines + _table(
        ["model"] + [f"PPL ({s})" for s in spaces],
        [[m] + [v.get(s) for s in spaces] for m, v in interp["ppl"].items()],
    )


def _manipulation(manip: Dict, results: Dict) -> List[str]:
    lines = [
        f"T={manip['T']}; edited: {manip.get('edited_images', 'all test images')}; probes trained on "
        f"{manip['num_probe_train_images']} images of the other split. {manip['protocol']}.",
        "",
    ]
    # The judges of this run: pixels and z_sem always, image features (e.g. Inception) when they ran.
    measured = [r for entry in manip["attributes"].values() for r in entry.values() if isinstance(r, dict)]
    spaces = [(s, n) for s, n in JUDGE_NAMES.items() if any(f"{s}_probe_moved" in r for r in measured)]
    width = 3 * len(spaces) + 3
    rows = []
    for attribute, entry in manip["attributes"].items():
        if "skipped" in entry:
            rows.append([attribute, "", entry["skipped"]] + [None] * width)
            continue
        for goal, row in entry.items():
            if "skipped" in row:
                rows.append([attribute, goal, row["skipped"]] + [None] * width)
                continue
            rows.append(
                [attribute, goal, row["num_images"]]
                + [row[f"{s}_probe_{k}"] for s, _ in spaces for k in ("before", "success", "moved")]
                + [row.get("other_attributes_change"), row["pixel_change_mean"], row["changed_pixel_fraction"]]
            )
    header = (
        ["attribute", "edit", "images"]
        + [f"{n} probe {k}" for _, n in spaces for k in ("before", "after", "moved toward goal")]
        + ["other attributes mean abs Δp", "mean abs Δpixel", "pixels changed > 0.1"]
    )
    lines += _table(header, rows)
    controlled = [
        (a, g, r) for a, e in manip["attributes"].items() for g, r in e.items() if "control_pixel_change_mean" in r
    ]
    if controlled:
        lines += [
            "Control: each image moved the same distance along a random direction instead; how often each "
            "judge then says the attribute moved toward the goal is its chance level:",
            "",
        ]
        lines += _table(
            ["attribute", "edit"]
            + [f"{n} probe moved: edit / random" for _, n in spaces]
            + ["mean abs Δpixel: edit / random"],
            [
                [a, g]
                + [f"{r[f'{s}_probe_moved']:.3f} / {r[f'{s}_control_moved']:.3f}" for s, _ in spaces]
                + [f"{r['pixel_change_mean']:.3g} / {r['control_pixel_change_mean']:.3g}"]
                for a, g, r in controlled
            ],
        )
    feature_judge = manip.get("judges", {}).get("features")
    if feature_judge:
        lines += [f"Feature probe: {feature_judge}.", ""]
    judges = manip.get("judge_auroc", {})
    if judges:
        lines += [
            "How well each judging probe tells the attribute on the real (unedited) images whose edits it "
            "judges (AUROC; near 0.5 the judge cannot tell whether an edit moved the attribute):",
            "",
        ]
        lines += _table(
            ["attribute"] + [f"{n} probe AUROC" for _, n in spaces],
            [[a] + [j.get(s) for s, _ in spaces] for a, j in judges.items()],
        )
    return lines


def _sampling(samp: Dict, results: Dict) -> List[str]:
    lines = [
        f"{samp['num_samples']} samples per row against {samp['num_real']} test images; features: "
        f"{samp['features']}. {samp['protocol']}.",
        "",
    ]
    for model, note in samp.get("notes", {}).items():
        lines += [f"{model}: {note}.", ""]
    if samp["rows"]:
        lines += _model_by_T_table(samp["rows"], "fid")
    if samp.get("conditional"):
        rows = []
        for attribute, entry in samp["conditional"].items():
            if "skipped" in entry:
                rows.append([attribute, entry["skipped"], None, None])
            else:
                fids = [entry["num_real_positives"], entry["fid_conditional"], entry["fid_unconditional"]]
                rows.append([attribute] + fids)
        lines += ["**Few-shot conditional sampling** (FID against the real positives of the class)", ""]
        lines += _table(["class", "real positives", "conditional", "unconditional (naive)"], rows)
    return lines


def _latent(lat: Dict, results: Dict) -> List[str]:
    lines = [
        f"{lat['num_samples']} sampled codes per T against the normalised z_sem of {lat['num_test_codes']} "
        f"test images and {lat.get('num_train_codes', 0)} training images (Euclidean distances in "
        "normalised z_sem; near copies: samples nearer to a training code than the closest 5% of the test "
        "codes are).",
        "",
    ]
    if "note" in lat:
        lines += [lat["note"] + ".", ""]
    rows = [
        [
            f"latent DDIM, T={r['T']}",
            r["frechet_to_test"],
            r.get("nearest_train_median"),
            f"{100 * r['near_copies']:.1f}%" if "near_copies" in r else None,
        ]
        for r in lat["rows"]
    ]
    if "num_train_codes" in lat:
        rows += [
            ["held-out test codes", None, lat["test_nearest_train_median"], "5% (by definition)"],
            ["training codes (floor)", lat["train_frechet_to_test"], None, None],
        ]
    header = ["codes", "Frechet distance to test codes", "median distance to nearest training code"]
    return lines + _table(header + ["near copies"], rows)


def markdown(results: Dict, title: str, plot_name: Optional[str], grid_name: Optional[str]) -> str:
    """The Markdown report: the header, the table of claims, then one part per section that ran."""
    env = results.get("environment", {})
    subset = f"; only examples with `{results['subset']}`" if results.get("subset") else ""
    inv = results.get("inversion") or {}
    inversion = ""
    if inv.get("inversion", "ddim") != "ddim":
        inversion = f"x_T by {inv['inversion']} inversion ({inv.get('inversion_iterations')} network calls per step). "
    lines = [
        f"# {title}",
        "",
        f"Pipeline `{results.get('pipeline')}`; baseline `{results.get('baseline')}`; "
        f"dataset `{results.get('dataset')}` (split `{results.get('split')}`{subset}), {results.get('resolution')} px. Seed {results.get('seed')}. "
        f"{inversion}"
        f"torch {env.get('torch')}, {env.get('cpu')}, {env.get('threads')} threads; {results.get('runtime_s')} s.",
        "",
    ]
    claims = results.get("claims", [])
    if claims:
        lines += ["## The paper's claims at this scale", ""]
        mark = {True: "holds", False: "does not hold", None: "not measured"}
        lines += _table(
            ["claim", "paper", "outcome", "measured"],
            [[c["claim"], c["source"], mark[c["holds"]], c["measured"]] for c in claims],
        )
    sections = (
        ("reconstruction", "Reconstruction (§5.4, Tables 1-2; §5.5)", _reconstruction),
        ("representation", "Linear-probe AUROC (Appendix E, Table 8)", _representation),
        ("interpolation", "Interpolation smoothness (Appendix F)", _interpolation),
        ("manipulation", "Attribute manipulation (§5.3, Appendix G)", _manipulation),
        ("sampling", "Sampling FID (§5.6-5.7, Tables 3-4)", _sampling),
        ("latent", "Latent DDIM in z_sem space (§4, Appendix C)", _latent),
    )
    for key, heading, body in sections:
        section = results.get(key)
        if not section:
            continue
        lines += [f"## {heading}", ""]
        if "skipped" in section:
            lines += [section["skipped"] + ".", ""]
        elif key == "reconstruction":
            lines += body(section, results, plot_name, grid_name)
        else:
            lines += body(section, results)
    return "\n".join(lines)


def quality_plot(results: Dict, path: str) -> Optional[str]:
    """Quality vs T (SSIM, PSNR, MSE and FID when measured). Returns a "skipped: ..." reason or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (pip install matplotlib)"
    panels = []
    rec = results.get("reconstruction", {}).get("rows", [])
    for key, label, log in (
        ("ssim", "SSIM (higher is better)", False),
        ("ssim_official", "SSIM, official zero-padded (higher is better)", False),
        ("psnr", "PSNR dB (higher is better)", False),
        ("mse", "MSE (lower is better)", True),
    ):
        if any(key in row for row in rec):
            panels.append((rec, key, label, log))
    fid_rows = results.get("sampling", {}).get("rows", [])
    if fid_rows:
        panels.append((fid_rows, "fid", "sample FID (lower is better)", False))
    if not panels:
        return "skipped: nothing measured against T"
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    colours = {}
    for ax, (rows, key, label, log) in zip(axes[0], panels):
        models, steps, lookup = _by_model_and_T(rows, key)
        for model in models:
            xs = [T for T in steps if lookup.get((model, T)) is not None]
            colour = colours.setdefault(model, f"C{len(colours)}")
            ax.plot(xs, [lookup[(model, T)] for T in xs], marker="o", label=model, color=colour)
        ax.set_xscale("log")
        ax.set_xticks(steps)
        ax.set_xticklabels([str(T) for T in steps])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("T (DDIM steps)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if key in ("ssim", "fid"):  # one legend per family of rows
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(
    results: Dict,
    output_dir: str,
    tag: str,
    title: str,
    examples: Optional[Dict[int, Dict[str, torch.Tensor]]] = None,
    inputs: Optional[torch.Tensor] = None,
) -> List[str]:
    """Writes `<tag>.json`, `<tag>.md`, `<tag>_quality_vs_T.png` and `<tag>_reconstructions.png`; returns paths."""
    os.makedirs(output_dir, exist_ok=True)
    written = []
    plot_name = f"{tag}_quality_vs_T.png"
    reason = quality_plot(results, os.path.join(output_dir, plot_name))
    results["plots"] = {"quality_vs_T": plot_name if reason is None else reason}
    if reason is None:
        written.append(os.path.join(output_dir, plot_name))
    grid_name = None
    if examples and inputs is not None:
        T = 20 if 20 in examples else sorted(examples)[0]
        grid_name = f"{tag}_reconstructions.png"
        rows = [inputs] + [imgs[: len(inputs)] for imgs in examples[T].values()]
        image_grid(rows, scale=2).save(os.path.join(output_dir, grid_name))
        results["plots"]["reconstructions"] = f"{grid_name}: rows = input, " + ", ".join(examples[T]) + f" at T={T}"
        written.append(os.path.join(output_dir, grid_name))
    json_path = os.path.join(output_dir, f"{tag}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=float)
    md_path = os.path.join(output_dir, f"{tag}.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(results, title, plot_name if reason is None else None, grid_name))
        if reason is not None:
            f.write(f"\nPlot {reason}.\n")
    return [json_path, md_path] + written
