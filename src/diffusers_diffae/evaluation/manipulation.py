"""Section 4, attribute manipulation (paper §5.3, Appendix G): edits along the classifier direction to the Eq. 11
target (or a fixed strength), judged by independent probes trained on another split (raw pixels; z_sem of the
re-encoded edit; image features such as Inception-v3, when available), the change of the other attributes, and how
many pixels the edit touches. Optionally limited to the images an attribute applies to, and controlled by moving
each image as far along a random direction, which gives each judge's chance level."""

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..pipelines.pipeline_diffae import DiffAELatents, edit_strength_for_target
from . import metrics
from .context import Evaluation, claim, log, mean
from .report import JUDGE_NAMES


# A judge whose AUROC on the real images it judges is below this cannot tell the attribute there (0.7 is the usual
# lower bound of "acceptable discrimination", Hosmer & Lemeshow), so whether it moves says nothing about the edit.
JUDGE_MIN_AUROC = 0.7


def eq11_strength(classifier, index: int, z_sem: torch.Tensor, target_logit: float) -> torch.Tensor:
    """Per-image strength alpha (N,) that moves the codes z_sem (N, D) to `target_logit` of head `index` (Eq. 11)."""
    with torch.no_grad():
        logit = classifier(z_sem.to(classifier.device, classifier.dtype)).logits[:, index].float().cpu()
    w = classifier.linear.weight[index].detach().float().cpu()
    return edit_strength_for_target(logit, w, target_logit)


def other_attributes_change(probes: Dict, z_before: torch.Tensor, z_after: torch.Tensor) -> float:
    """Mean over the `probes` (name -> z_sem probe) of the mean |change of probability| from z_before to z_after
    (N, D): how much an edit moves the attributes it does not aim at."""
    changes = [
        (torch.sigmoid(metrics.probe_scores(z_after, p)) - torch.sigmoid(metrics.probe_scores(z_before, p)))
        .abs()
        .mean()
        for p in probes.values()
    ]
    return float(torch.stack(changes).mean())


def evaluate(
    ev: Evaluation,
    attributes: Sequence[str],
    steps: int,
    strength: Optional[float] = None,
    where: Optional[str] = None,
    where_mask: Optional[np.ndarray] = None,
    control: bool = False,
) -> Dict:
    """Edits every test image not yet in the goal class; with `where`, only those whose 0/1 `where_mask` (N,)
    is 1 (the images an attribute applies to, e.g. people for hair or gender edits). With `control`, each image is
    also moved the same distance along a random direction of normalised z_sem (its own, seeded), and every judge
    scores that edit too: how often a judge says "moved toward the goal" for an edit that does not aim at it is
    the judge's chance level."""
    if (where is None) != (where_mask is None):
        raise ValueError("manipulation: give both `where` and `where_mask`, or neither")
    if where_mask is not None and len(where_mask) != ev.data.images.shape[0]:
        raise ValueError(
            f"manipulation: where_mask has {len(where_mask)} entries for {ev.data.images.shape[0]} test images"
        )
    editable = np.ones(ev.data.images.shape[0], bool) if where_mask is None else np.asarray(where_mask) == 1
    classifier = ev.pipe.classifier
    if classifier is None:
        return {"skipped": "skipped: the pipeline has no classifier component"}
    if ev.train_data is None:
        return {"skipped": "skipped: the manipulation probes need labelled images of another split (--train_split)"}
    binary = [a for a in classifier.attribute_names if classifier.attribute_type(a) == "binary"]
    targets = [a for a in attributes if a in binary and a in ev.data.labels and a in ev.train_data.labels]
    if not targets:
        return {
            "skipped": f"skipped: no attribute is both a binary classifier head ({binary}) and a labelled column "
            f"({sorted(ev.data.labels)})"
        }
    log(f"manipulation of {targets} (T={steps})")
    train_z, probes = ev.train_z_sem, ev.probes
    latents = DiffAELatents(z_sem=ev.z_sem, x_T=ev.x_T(steps))
    recon = ev.decode(latents.x_T, latents.z_sem, steps)
    recon_z = ev.encode_z_sem(recon)
    with torch.no_grad():
        train_logits = classifier(train_z.to(classifier.device, classifier.dtype)).logits.float().cpu()
    # How well each judge tells the attributes on the real images whose edits it judges: a judge near 0.5 there
    # cannot say whether an edit moved the attribute.
    editable_idx = torch.from_numpy(np.flatnonzero(editable))
    spaces = {"pixels": ev.data.images, "z_sem": ev.z_sem}
    if ev.fit_feature_probes():
        # Only the edited images' features: the feature network is the slowest part of this section.
        real, decoded = (ev.image_features(x[editable_idx]) for x in (ev.data.images, recon))
        spaces["features"] = real.new_zeros(len(editable), real.shape[1]).index_copy_(0, editable_idx, real)
        recon_features = torch.zeros_like(spaces["features"]).index_copy_(0, editable_idx, decoded)
    judges = {s: ev.attribute_aurocs(f, s, editable) for s, f in spaces.items()}
    control_generator = torch.Generator().manual_seed(ev.seed + 4)

    def judge_views(images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """What each judge reads of (N, C, H, W) images: the pixels, z_sem of the re-encoded images and, when a
        feature network runs, its features."""
        views = {"pixels": images, "z_sem": ev.encode_z_sem(images)}
        if "features" in spaces:
            views["features"] = ev.image_features(images)
        return views

    results, judge_auroc = {}, {}
    for attribute in targets:
        if attribute not in probes:
            results[attribute] = {"skipped": "skipped: the training split has only one class of this attribute"}
            continue
        index = classifier.attribute_index(attribute)
        labels = ev.data.labels[attribute]
        train_labels = ev.train_data.labels[attribute]
        judge_auroc[attribute] = {s: judges[s].get(attribute) for s in judges}
        entry = {}
        for goal, select in (("to_positive", labels == 0), ("to_negative", labels == 1)):
            idx = torch.from_numpy(np.flatnonzero(select & editable))
            if len(idx) == 0:
                entry[goal] = {"skipped": "skipped: no edited test image starts on this side"}
                continue
            goal_label = 1 if goal == "to_positive" else 0
            kwargs = {}
            if strength is not None:
                kwargs["strength"] = strength if goal_label == 1 else -strength
                protocol = f"strength {kwargs['strength']}"
            else:
                # Eq. 11: every image is moved to the median logit of the real images of the goal class.
                reference = train_logits[torch.from_numpy(train_labels == goal_label), index]
                if reference.numel() == 0:
                    entry[goal] = {"skipped": "skipped: no training image of the goal class for the Eq. 11 target"}
                    continue
                kwargs["target_logit"] = float(reference.median())
                protocol = f"Eq. 11 target logit {kwargs['target_logit']:.3f} (median of real goal-class images)"
            edited = ev.edit(latents, idx, steps, attribute=attribute, **kwargs)
            before = recon[idx]
            sign = 1.0 if goal_label == 1 else -1.0
            row = {"num_images": len(idx), "protocol": protocol}
            before_views = {"pixels": before, "z_sem": recon_z[idx]}
            if "features" in spaces:
                before_views["features"] = recon_features[idx]
            # Each judge's probe score of the unedited reconstructions, against which edits are judged.
            lb = {space: metrics.probe_scores(f, probes[attribute][space]) for space, f in before_views.items()}
            edited_views = judge_views(edited)
            for space, feats_after in edited_views.items():
                la = metrics.probe_scores(feats_after, probes[attribute][space])
                row[f"{space}_probe_success"] = float(((la > 0) == bool(goal_label)).double().mean())
                row[f"{space}_probe_before"] = float(((lb[space] > 0) == bool(goal_label)).double().mean())
                row[f"{space}_probe_moved"] = float((sign * (la - lb[space]) > 0).double().mean())
            if control:
                # The same per-image distance as the edit (|alpha| * sqrt(D) in normalised z_sem), random aim.
                if strength is not None:
                    alpha = torch.full((len(idx),), abs(strength))
                else:
                    alpha = eq11_strength(classifier, index, latents.z_sem[idx], kwargs["target_logit"]).abs()
                directions = torch.randn(len(idx), latents.z_sem.shape[1], generator=control_generator)
                random_edit = ev.edit(latents, idx, steps, direction=directions, strength=alpha)
                for space, feats_random in judge_views(random_edit).items():
                    lr = metrics.probe_scores(feats_random, probes[attribute][space])
                    row[f"{space}_control_moved"] = float((sign * (lr - lb[space]) > 0).double().mean())
                row["control_pixel_change_mean"] = mean(metrics.pixel_change(before, random_edit)[0])
            others = {o: p["z_sem"] for o, p in probes.items() if o != attribute}
            if others:
                row["other_attributes_change"] = other_attributes_change(others, recon_z[idx], edited_views["z_sem"])
            mean_change, changed = metrics.pixel_change(before, edited)
            row["pixel_change_mean"] = mean(mean_change)
            row["changed_pixel_fraction"] = mean(changed)
            entry[goal] = row
        results[attribute] = entry
    return {
        "num_test_images": int(ev.data.images.shape[0]),
        "edited_images": f"the {int(editable.sum())} test images where {where}" if where else "all test images",
        "where": where,
        "num_probe_train_images": int(ev.train_data.images.shape[0]),
        "T": steps,
        "protocol": "edit = pipeline.edit with the inverted x_T kept; success = an independent logistic probe "
        "(trained on the other split) predicts the goal class: on raw pixels of the edit, on z_sem of the "
        "re-encoded edit"
        + (f", and on {ev.features_name} features of the edit" if "features" in spaces else "")
        + "; 'before' is the same on the unedited reconstruction; other_attributes_change = mean "
        "|change of probability| of the other attributes' z_sem probes; pixel change against the unedited "
        "reconstruction, changed = largest channel change > 0.1"
        + (
            "; control = the same per-image distance in normalised z_sem along a random direction of its own, "
            "scored by the same judges (their chance level)"
            if control
            else ""
        ),
        "control": control,
        "attributes": results,
        "judges": {
            "pixels": "raw pixels",
            "z_sem": "z_sem of the re-encoded image",
            "features": ev.features_name
            if "features" in spaces
            else (ev.features_reason or "skipped: no feature network"),
        },
        "judge_auroc": judge_auroc,
    }


def claims(results: Dict) -> List[Dict]:
    """§5.3's claim: linear edits of z_sem move the target attribute, as judged by the probes that can tell it."""
    manip = results.get("manipulation", {})
    where, judge_auroc = manip.get("where"), manip.get("judge_auroc", {})
    edits = [
        (f"{a} {goal}", a, row)
        for a, entry in manip.get("attributes", {}).items()
        for goal, row in entry.items()
        if isinstance(row, dict) and "pixels_probe_success" in row
    ]
    if not edits:
        return []

    def row_judges(row: Dict) -> List[str]:
        return [s for s in JUDGE_NAMES if f"{s}_probe_moved" in row]

    def sighted(attribute: str, row: Dict) -> List[str]:
        """The judges of an edit that can tell its attribute on the real images it edits (AUROC unknown counts)."""
        aurocs = judge_auroc.get(attribute, {})
        return [s for s in row_judges(row) if aurocs.get(s) is None or aurocs[s] >= JUDGE_MIN_AUROC]

    def measured(name: str, attribute: str, row: Dict) -> str:
        spaces, counted = row_judges(row), sighted(attribute, row)
        blind = [f"{JUDGE_NAMES[s]} AUROC {judge_auroc[attribute][s]:.2f}" for s in spaces if s not in counted]
        moved = " / ".join(f"{row[s + '_probe_moved']:.0%}" for s in spaces)
        reached = " / ".join(f"{row[s + '_probe_success']:.0%}" for s in spaces)
        names = " / ".join(JUDGE_NAMES[s] for s in spaces)
        blind = f"; blind, not counted: {', '.join(blind)}" if blind else ""
        control = ""
        if all(f"{s}_control_moved" in row for s in spaces):
            control = ", random direction moved " + " / ".join(f"{row[s + '_control_moved']:.0%}" for s in spaces)
        return f"{name}: moved {moved} ({names} probe{blind}){control}, goal class reached {reached}"

    return [
        claim(
            "Linear edits of z_sem move the target attribute the intended way (project target: the scores of "
            f"every held-out probe that can tell the attribute on the edited images (AUROC >= {JUDGE_MIN_AUROC}) "
            f"move toward the goal for >= 90% of images{f' where {where}' if where else ''})",
            "§5.3, Appendix G",
            all(sighted(a, r) and all(r[s + "_probe_moved"] >= 0.9 for s in sighted(a, r)) for _, a, r in edits),
            "; ".join(measured(n, a, r) for n, a, r in edits),
        )
    ]
