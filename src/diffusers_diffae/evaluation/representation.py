"""Section 2, representation (paper Appendix E, Table 8): cross-validated linear-probe AUROC per attribute on z_sem,
on DiffAE's x_T, on raw pixels and on the baseline's x_T, and the AUROC of probes fitted on the other split."""

from typing import Dict, List, Optional

import numpy as np

from . import metrics
from .context import Evaluation, claim, log


def evaluate(ev: Evaluation, steps: int, num_folds: int = 5, groups: Optional[str] = None) -> Dict:
    """Cross-validated probes, x_T inverted with `steps` DDIM steps; with `groups` (a column in `ev.data.columns`)
    every fold holds out whole groups, so near-copies of one image (e.g. the skin-tone variants of one emoji) never
    sit on both sides of a fold."""
    if not ev.data.labels:
        return {"skipped": "skipped: no --attributes given"}
    group_values = ev.data.columns[groups] if groups else None
    log(f"representation (x_T with T={steps}, {num_folds}-fold probes{f', grouped by {groups}' if groups else ''})")
    spaces = {"z_sem": ev.z_sem, "x_T": ev.x_T(steps), "pixels": ev.data.images}
    if ev.baseline is not None:
        spaces["baseline x_T"] = ev.baseline_x_T(steps)
    results = {}
    for name, labels in ev.data.labels.items():
        positives = int(labels.sum())
        entry = {"positives": positives, "negatives": int(len(labels) - positives)}
        if min(positives, len(labels) - positives) < num_folds:
            entry["skipped"] = f"skipped: fewer than {num_folds} examples of one class among the test images"
        else:
            try:
                for space, feats in spaces.items():
                    entry[space] = metrics.linear_probe_auroc(
                        feats, labels, num_folds=num_folds, seed=ev.seed, groups=group_values
                    )
            except ValueError as e:  # too few groups of one class for the folds
                entry = {"positives": entry["positives"], "negatives": entry["negatives"], "skipped": f"skipped: {e}"}
        results[name] = entry
    measured = [r for r in results.values() if "skipped" not in r]
    mean = {s: float(np.mean([r[s] for r in measured])) for s in spaces} if measured else {}
    # The paper's probes are fitted on one part of the data and scored on the rest (Appendix E): here the probes
    # fitted on the other split, scored on the test images (z_sem and pixels; x_T would need the other split
    # inverted).
    by_space = {s: ev.attribute_aurocs(f, s) for s, f in (("z_sem", ev.z_sem), ("pixels", ev.data.images))}
    held_out = {name: {s: by_space[s][name] for s in by_space} for name in by_space["z_sem"]}
    return {
        "num_images": int(ev.data.images.shape[0]),
        "protocol": f"logistic regression on z-normalised features, L2 1e-3, L-BFGS; AUROC of pooled out-of-fold "
        f"scores, {num_folds} stratified folds"
        + (f" of whole groups of `{groups}`" if groups else " of single images")
        + f"; x_T inverted with T={steps}",
        "groups": groups,
        "held_out": held_out,
        "num_probe_train_images": int(ev.train_data.images.shape[0]) if ev.train_data is not None else 0,
        "x_T_steps": steps,
        "attributes": results,
        "mean": mean,
    }


def claims(results: Dict) -> List[Dict]:
    """Appendix E's claim: z_sem is the most linearly informative code."""
    rep = results.get("representation", {})
    mean = rep.get("mean", {})
    if "z_sem" not in mean:
        return []
    others = {k: v for k, v in mean.items() if k != "z_sem"}
    return [
        claim(
            "A linear probe on z_sem predicts attributes better than on x_T or raw pixels",
            "Appendix E, Table 8",
            all(mean["z_sem"] > v for v in others.values()),
            f"mean AUROC z_sem {mean['z_sem']:.3f}; "
            + ", ".join(f"{k} {v:.3f}" for k, v in others.items())
            + (f" (folds of whole `{rep['groups']}` groups)" if rep.get("groups") else ""),
        )
    ]
