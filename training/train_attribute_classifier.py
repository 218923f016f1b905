#!/usr/bin/env python
"""Train linear attribute heads on normalised z_sem (paper §5.3, §5.6; Appendix A.2, E).

Each attribute is one linear head `w . z_n + b` on `z_n = (z_sem - mean) / std` (official `ClsModel`): logistic
regression (BCE) for binary attributes, least squares (MSE) for continuous ones. Labels come from dataset
columns. The frozen encoder of a trained `DiffAEPipeline` encodes every image once (centre crop, no flip).

    python training/train_attribute_classifier.py --pipeline diffae-emoji32 --dataset_name ./emoji32 \
        --label_columns male,female,dark_skin --validation_split 0.3

Held-out AUROC per binary attribute (rank-based Mann-Whitney estimate; Appendix E reports 0.925 averaged over the
40 CelebA-HQ attributes) goes to a JSON report and the model card. Few-shot settings of §5.6 (following D2C):
`--few_shot K --few_shot_mode binary` trains on K labelled positives and K labelled negatives;
`--few_shot_mode pu` on K labelled positives plus unlabelled images (all treated as negatives), with the positives
oversampled to match (Appendix A.2). The `classifier` component is added to the pipeline folder, ready for
`pipe.edit(images, attribute=...)` and conditional sampling `pipe(attribute=...)`.
"""

import argparse
import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger

import _checkpoints
import _common
import _data
import _models
from _common import TrainingInputError
from diffusers_diffae.evaluation import metrics


logger = get_logger("train_attribute_classifier")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train linear attribute classifiers on DiffAE semantic codes.")
    _data.add_encoding_arguments(parser)
    _data.add_dataset_arguments(parser)
    parser.add_argument(
        "--label_columns",
        type=str,
        required=True,
        help="Comma-separated label columns, one head each. bool, 0/1 (or CelebA's -1/1) integers and two-class "
        "ClassLabels are binary; floats are continuous.",
    )
    parser.add_argument(
        "--continuous_columns",
        type=str,
        default="",
        help="Comma-separated label columns to regress even though they hold integers.",
    )
    parser.add_argument(
        "--validation_split",
        type=float,
        default=0.3,
        help="Fraction of the rows held out for evaluation (Appendix E: 30%%).",
    )
    parser.add_argument(
        "--validation_split_name",
        type=str,
        default=None,
        help="Evaluate on this split of the dataset instead of a random fraction of the training split.",
    )
    parser.add_argument(
        "--split_group_column",
        type=str,
        default=None,
        help="Rows sharing a value of this column stay on the same side of the split (e.g. near-duplicate images).",
    )
    parser.add_argument(
        "--z_sem_statistics",
        type=str,
        default="auto",
        choices=["auto", "encoder", "data"],
        help="Normalise with the statistics stored in the encoder (official: the autoencoder's training set) or "
        "with this training split's; auto: the encoder's when they were set (train_latent_ddim.py sets them).",
    )

    group = parser.add_argument_group("few-shot (paper §5.6)")
    group.add_argument("--few_shot", type=int, default=None, help="K labelled positives (one binary label column).")
    group.add_argument(
        "--few_shot_mode",
        type=str,
        default="binary",
        choices=["binary", "pu"],
        help="binary: K positives + K negatives; pu: K positives + unlabelled rows with the positives oversampled.",
    )
    group.add_argument(
        "--num_unlabeled",
        type=int,
        default=None,
        help="PU mode: unlabelled training rows to use (default: all the other training rows; the paper: 10k).",
    )

    group = parser.add_argument_group("optimisation")
    group.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate (official: 1e-3).")
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument("--train_batch_size", type=int, default=32, help="Official: 32.")
    group.add_argument(
        "--max_train_steps",
        type=int,
        default=9375,
        help="Adam steps over the cached codes (default: the official full-label classifiers' 300,000 codes, 9,375 "
        "steps at batch 32).",
    )
    group.add_argument("--seed", type=int, default=0)

    group = parser.add_argument_group("output")
    group.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="Where the pipeline with the classifier goes (default: --pipeline).",
    )
    group.add_argument(
        "--report_path",
        type=str,
        default=None,
        help="JSON report of the held-out metrics (default: <output_dir>/classifier_report.json).",
    )
    _common.add_hub_arguments(parser)
    args = parser.parse_args(argv)
    args.output_dir = args.output_dir or args.pipeline
    args.report_path = args.report_path or os.path.join(args.output_dir, "classifier_report.json")
    args.z_sem_cache = args.z_sem_cache or os.path.join(args.output_dir, "classifier_training", "z_sem.safetensors")

    _common.check_positive(args, ["train_batch_size", "encode_batch_size", "learning_rate", "max_train_steps"])
    args.label_columns = [c.strip() for c in args.label_columns.split(",") if c.strip()]
    args.continuous_columns = [c.strip() for c in args.continuous_columns.split(",") if c.strip()]
    if not args.label_columns or len(set(args.label_columns)) != len(args.label_columns):
        raise TrainingInputError("--label_columns must name one or more distinct columns")
    if args.few_shot is not None:
        if args.few_shot < 1:
            raise TrainingInputError("--few_shot must be a positive number of labelled positives")
        if len(args.label_columns) != 1:
            raise TrainingInputError("the few-shot modes train one binary attribute: give a single --label_columns")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def binary_auroc(scores, labels) -> float:
    """`metrics.auroc` (Mann-Whitney, ties count one half), NaN when one class is missing so the report keeps its row."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    if labels.all() or not labels.any():
        return float("nan")
    return metrics.auroc(np.asarray(scores, dtype=np.float64).reshape(-1), labels)


def regression_metrics(prediction: np.ndarray, target: np.ndarray) -> Dict[str, float]:
    error = prediction - target
    variance = float(np.var(target))
    pearson = float(np.corrcoef(prediction, target)[0, 1]) if np.std(prediction) > 0 and variance > 0 else float("nan")
    return {
        "mse": float(np.mean(error**2)),
        "r2": float(1 - np.mean(error**2) / variance) if variance > 0 else float("nan"),
        "pearson": pearson,
    }


# ----------------------------------------------------------------------------------------------------------------
# Labels and splits
# ----------------------------------------------------------------------------------------------------------------


def label_columns(dataset, names: List[str], continuous: List[str]) -> Tuple[torch.Tensor, List[str]]:
    """Reads and checks the label columns: returns `(N, K)` float targets (binary as 0/1) and the K types."""
    import datasets

    values, types = [], []
    for name in names:
        if name not in dataset.column_names:
            raise TrainingInputError(
                f"the dataset has no label column {name!r}; its columns are {dataset.column_names}"
            )
        feature = dataset.features[name]
        column = dataset[name]
        missing = sum(v is None for v in column)
        if missing:
            raise TrainingInputError(f"label column {name!r} has {missing} missing values")
        hint = (
            f"label column {name!r} has type {feature!r}; labels must be bool, 0/1 (or -1/1) integers, a two-class "
            "ClassLabel, or floats (continuous)"
        )
        if isinstance(feature, datasets.ClassLabel):
            if len(feature.names) != 2:
                raise TrainingInputError(f"{hint}; this ClassLabel has {len(feature.names)} classes")
            array, kind = np.asarray(column, dtype=np.float64), "binary"
        elif isinstance(feature, datasets.Value) and feature.dtype == "bool":
            array, kind = np.asarray(column, dtype=np.float64), "binary"
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")):
            array = np.asarray(column, dtype=np.float64)
            distinct = set(np.unique(array).tolist())
            if name in continuous:
                kind = "continuous"
            elif distinct <= {0.0, 1.0}:
                kind = "binary"
            elif distinct <= {-1.0, 1.0}:
                array, kind = (array > 0).astype(np.float64), "binary"  # CelebA's -1/1 convention
            else:
                raise TrainingInputError(
                    f"label column {name!r} holds {len(distinct)} distinct integers {sorted(distinct)[:6]}; a binary "
                    f"attribute needs 0/1 or -1/1. Pass --continuous_columns {name} to regress it"
                )
        elif isinstance(feature, datasets.Value) and feature.dtype.startswith("float"):
            array, kind = np.asarray(column, dtype=np.float64), "continuous"
        else:
            raise TrainingInputError(hint)
        if not np.all(np.isfinite(array)):
            raise TrainingInputError(f"label column {name!r} contains NaN or infinite values")
        values.append(array)
        types.append(kind)
    unknown = set(continuous) - set(names)
    if unknown:
        raise TrainingInputError(f"--continuous_columns names columns not in --label_columns: {sorted(unknown)}")
    return torch.from_numpy(np.stack(values, axis=1)).float(), types


def split_rows(dataset, fraction: float, group_column: Optional[str], seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Random held-out split (by groups when given): returns (train indices, validation indices)."""
    if not 0 < fraction < 1:
        raise TrainingInputError(f"--validation_split must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    n = len(dataset)
    if group_column is None:
        order = rng.permutation(n)
        count = max(1, int(round(n * fraction)))
        validation, train = np.sort(order[:count]), np.sort(order[count:])
    else:
        if group_column not in dataset.column_names:
            raise TrainingInputError(f"--split_group_column {group_column!r} is not a column of the dataset")
        _, groups = np.unique(np.asarray([str(v) for v in dataset[group_column]]), return_inverse=True)
        chosen = rng.permutation(groups.max() + 1)[: max(1, int(round((groups.max() + 1) * fraction)))]
        is_validation = np.isin(groups, chosen)
        validation, train = np.flatnonzero(is_validation), np.flatnonzero(~is_validation)
    if len(train) == 0 or len(validation) == 0:
        raise TrainingInputError(f"the split left {len(train)} training and {len(validation)} validation rows")
    return train, validation


def few_shot_rows(
    targets: torch.Tensor, train: np.ndarray, k: int, mode: str, num_unlabeled: Optional[int], seed: int
) -> Tuple[np.ndarray, torch.Tensor, Dict]:
    """Rows and targets of the few-shot settings (paper §5.6, D2C): returns (row indices, (M, 1) targets, info).

    binary: K positives and K negatives, both labelled. pu: K labelled positives plus unlabelled rows (their
    labels are not used: they count as negatives); positives are repeated to match the unlabelled count.
    """
    rng = np.random.default_rng(seed)
    labels = targets[train, 0].numpy() > 0.5
    positives, negatives = train[labels], train[~labels]
    if len(positives) < k:
        raise TrainingInputError(f"--few_shot {k}: the training split has only {len(positives)} positives")
    chosen_pos = rng.choice(positives, size=k, replace=False)
    if mode == "binary":
        if len(negatives) < k:
            raise TrainingInputError(f"--few_shot {k}: the training split has only {len(negatives)} negatives")
        chosen_neg = rng.choice(negatives, size=k, replace=False)
        rows = np.concatenate([chosen_pos, chosen_neg])
        y = np.concatenate([np.ones(k), np.zeros(k)])
        info = {"mode": "binary", "positives": k, "negatives": k}
    else:
        unlabeled = np.setdiff1d(train, chosen_pos)
        if num_unlabeled is not None:
            if num_unlabeled > len(unlabeled):
                raise TrainingInputError(f"--num_unlabeled {num_unlabeled} exceeds the {len(unlabeled)} other rows")
            unlabeled = rng.choice(unlabeled, size=num_unlabeled, replace=False)
        repeats = max(1, math.ceil(len(unlabeled) / k))  # oversample positives to balance (Appendix A.2)
        rows = np.concatenate([np.tile(chosen_pos, repeats), unlabeled])
        y = np.concatenate([np.ones(k * repeats), np.zeros(len(unlabeled))])
        info = {"mode": "pu", "positives": k, "unlabeled": int(len(unlabeled)), "positive_repeats": repeats}
    return rows, torch.from_numpy(y).float()[:, None], info


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def train_heads(
    classifier, z_normalized: torch.Tensor, targets: torch.Tensor, types: List[str], args, device
) -> List[float]:
    """Adam on BCE (binary heads) + MSE (continuous heads); minibatches drawn with a seeded generator."""
    classifier.to(device).train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    binary = torch.tensor([t == "binary" for t in types], device=device)
    z_normalized, targets = z_normalized.to(device), targets.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    batch = min(args.train_batch_size, len(z_normalized))
    losses, order, position = [], torch.randperm(len(z_normalized), generator=generator), 0
    for _ in range(args.max_train_steps):
        if position + batch > len(order):
            order, position = torch.randperm(len(z_normalized), generator=generator), 0
        rows = order[position : position + batch].to(device)
        position += batch
        logits = classifier(z_normalized[rows], normalized=True).logits
        y = targets[rows]
        loss = logits.new_zeros(())
        if binary.any():
            loss = loss + F.binary_cross_entropy_with_logits(logits[:, binary], y[:, binary])
        if (~binary).any():
            loss = loss + F.mse_loss(logits[:, ~binary], y[:, ~binary])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    values = torch.stack(losses).cpu()
    if not torch.isfinite(values).all():
        step = int((~torch.isfinite(values)).nonzero()[0]) + 1
        raise _common.NonFiniteLossError(f"the classifier loss became NaN or infinite at step {step}")
    return values.tolist()


def evaluate(classifier, z_normalized, targets, names, types) -> Dict[str, Dict]:
    with torch.no_grad():
        logits = classifier(z_normalized.to(classifier.linear.weight.device), normalized=True).logits.cpu().numpy()
    report = {}
    for k, (name, kind) in enumerate(zip(names, types)):
        y = targets[:, k].numpy()
        if kind == "binary":
            auroc = binary_auroc(logits[:, k], y)
            report[name] = {
                "type": "binary",
                "auroc": None if math.isnan(auroc) else auroc,
                "accuracy": float(np.mean((logits[:, k] > 0) == (y > 0.5))),
                "positives": int(y.sum()),
                "count": int(len(y)),
            }
            if math.isnan(auroc):
                report[name]["note"] = "AUROC undefined: the held-out rows contain only one class"
        else:
            report[name] = {"type": "continuous", **regression_metrics(logits[:, k], y), "count": int(len(y))}
    return report


def card_notes(args: argparse.Namespace, summary: Dict) -> str:
    """The model card's `## Attribute classifier` section: the training setting and a table of held-out metrics."""
    few_shot = summary["few_shot"]
    setting = "all labelled training rows"
    if few_shot and few_shot["mode"] == "binary":
        setting = f"few-shot binary: {args.few_shot} labelled positives and {args.few_shot} labelled negatives"
    elif few_shot:
        setting = (
            f"few-shot PU: {args.few_shot} labelled positives (oversampled x{few_shot['positive_repeats']}) "
            f"and {few_shot['unlabeled']} unlabelled rows"
        )
    held_out = (
        f"split `{args.validation_split_name}`" if args.validation_split_name else f"{args.validation_split:.0%}"
    )
    lines = [
        "Linear heads on normalised z_sem (`classifier` component), for attribute editing "
        "(`pipe.edit(images, attribute=...)`) and conditional sampling (`pipe(attribute=...)`).",
        "",
        f"- trained on {setting} of `{args.dataset_name or args.train_data_dir}`; statistics: {summary['statistics']}",
        f"- held out: {summary['validation_rows']} rows ({held_out})",
    ]
    if summary["mean_auroc"] is not None:
        lines.append(f"- mean AUROC over binary attributes: {summary['mean_auroc']:.3f}")
    lines += ["", "| attribute | type | held-out metric |", "|---|---|---|"]
    for name, row in summary["attributes"].items():
        if row["type"] == "binary":
            metric = "AUROC n/a (one class)" if row["auroc"] is None else f"AUROC {row['auroc']:.3f}"
            metric += f", accuracy {row['accuracy']:.3f} ({row['positives']}/{row['count']} positive)"
        else:
            metric = f"MSE {row['mse']:.4g}, R² {row['r2']:.3f}, Pearson {row['pearson']:.3f}"
        lines.append(f"| {name} | {row['type']} | {metric} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    names, continuous = args.label_columns, args.continuous_columns

    from diffusers_diffae import AttributeClassifier

    # 0. the outputs, the trained autoencoder and the accelerator (the heads train on the main process)
    _checkpoints.check_output_folder(args.output_dir, "--output_dir")
    if os.path.isdir(args.report_path):
        raise TrainingInputError(f"--report_path {args.report_path!r} is a folder; give a JSON file name")
    _checkpoints.check_output_folder(os.path.dirname(os.path.abspath(args.report_path)), "--report_path's folder")
    pipe = _models.load_autoencoder(args)
    accelerator = _common.make_accelerator()

    # 1. data and labels, all checked before the (expensive) encoding
    dataset = _data.load_dataset_from_args(args)
    targets, types = label_columns(dataset, names, continuous)
    if args.validation_split_name:
        held_out = _data.load_dataset_from_args(args, split=args.validation_split_name)
        held_targets, held_types = label_columns(held_out, names, continuous)
        if held_types != types:
            raise TrainingInputError(f"label types differ between splits: {types} vs {held_types}")
        train_rows = np.arange(len(dataset))
    else:
        train_rows, validation_rows = split_rows(dataset, args.validation_split, args.split_group_column, args.seed)
    if args.few_shot is not None and types[0] != "binary":
        raise TrainingInputError(f"the few-shot modes need a binary attribute; {names[0]!r} is continuous")

    # 2. codes, and the statistics that normalise them
    encoder = pipe.encoder.to(accelerator.device)
    z_sem = _data.encode_dataset(accelerator, encoder, dataset, args, args.z_sem_cache, args.encode_batch_size)
    if args.validation_split_name:
        cache = args.z_sem_cache.replace(".safetensors", f"-{args.validation_split_name}.safetensors")
        held_z = _data.encode_dataset(accelerator, encoder, held_out, args, cache, args.encode_batch_size)
    else:
        held_z, held_targets = z_sem[validation_rows], targets[validation_rows]
    if not accelerator.is_main_process:  # the heads are tiny: one process trains them
        accelerator.wait_for_everyone()
        return 0
    # The fresh buffers (mean 0, std 1) of an encoder whose statistics were never stored do not count as set.
    encoder_statistics = not (torch.all(encoder.z_sem_mean == 0) and torch.all(encoder.z_sem_std == 1))
    if args.z_sem_statistics == "encoder" or (args.z_sem_statistics == "auto" and encoder_statistics):
        mean, std = encoder.z_sem_mean.cpu().float(), encoder.z_sem_std.cpu().float()
        source = "the encoder's stored statistics"
    else:
        train_z = z_sem[train_rows].double()
        mean, std = train_z.mean(0).float(), train_z.std(0).clamp_min(1e-12).float()
        source = "the training split"
    logger.info(f"normalising z_sem with {source}")

    # 3. training rows (few-shot or all) and the heads
    few_shot_info = None
    if args.few_shot is not None:
        rows, y, few_shot_info = few_shot_rows(
            targets, train_rows, args.few_shot, args.few_shot_mode, args.num_unlabeled, args.seed
        )
    else:
        rows, y = train_rows, targets[train_rows]
    classifier = AttributeClassifier(num_channels=z_sem.shape[1], attribute_names=names, attribute_types=types)
    classifier.set_z_sem_statistics(mean, std)
    z_train = classifier.normalize_z_sem(z_sem[rows].float())
    try:
        losses = train_heads(classifier, z_train, y, types, args, accelerator.device)
    except _common.NonFiniteLossError as e:
        logger.error(str(e))
        accelerator.wait_for_everyone()
        return 2

    # 4. held-out metrics, and the edit targets (Eq. 11: the median logit of the real positives)
    classifier.eval()
    held_z_normalized = classifier.normalize_z_sem(held_z.float().to(classifier.z_sem_mean.device))
    report = evaluate(classifier, held_z_normalized, held_targets, names, types)
    with torch.no_grad():
        train_logits = classifier(z_train.to(classifier.linear.weight.device), normalized=True).logits.cpu()
    target_logits = [
        float(train_logits[y[:, k] > 0.5, k].median()) if kind == "binary" and (y[:, k] > 0.5).any() else None
        for k, kind in enumerate(types)
    ]
    final = AttributeClassifier(
        num_channels=z_sem.shape[1], attribute_names=names, attribute_types=types, target_logits=target_logits
    )
    final.load_state_dict(classifier.state_dict())

    # 5. the classifier into the pipeline folder, the report and the model card
    binary_scores = [r["auroc"] for r in report.values() if r["type"] == "binary" and r["auroc"] is not None]
    summary = {
        "attributes": report,
        "mean_auroc": float(np.mean(binary_scores)) if binary_scores else None,
        "train_rows": int(len(rows)),
        "validation_rows": int(len(held_targets)),
        "statistics": source,
        "few_shot": few_shot_info,
        "final_loss": float(np.mean(losses[-50:])),
        "target_logits": dict(zip(names, target_logits)),
    }
    for name, row in report.items():
        values = [f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "type"]
        logger.info(f"{name}: {', '.join(values)}")
    pipe.register_modules(classifier=final.to("cpu"))
    _checkpoints.save_stage(pipe, args, "Attribute classifier", card_notes(args, summary))
    _common.write_file_atomically(
        args.report_path,
        lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2), encoding="utf-8"),
        "the report",
    )
    logger.info(f"added the classifier to {args.output_dir}; report: {args.report_path}")
    if args.push_to_hub:
        _common.push_to_hub(args, args.output_dir, "attribute classifier")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    _common.run_main(main)
