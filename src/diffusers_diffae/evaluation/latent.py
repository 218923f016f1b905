"""Section 6, the latent DDIM alone (paper §4, Appendix C), in normalised z_sem space: Frechet distance of its
samples to the test images' codes (floor: the training codes' distance) and, as the memorisation check, each
sample's distance to the nearest training code against that of the held-out test codes."""

from typing import Dict, List, Sequence

import torch

from . import metrics
from .context import Evaluation, claim, log


def evaluate(ev: Evaluation, steps: Sequence[int], num_samples: int = 1024) -> Dict:
    """How closely the latent DDIM's codes follow the real normalised z_sem (§4), and whether they copy its
    training codes (Appendix C), measured in z_sem space, so without any image network.

    For every T: the Frechet distance of `num_samples` sampled codes to the test images' codes (next to the
    distance of the training images' codes to them, the floor a perfect sampler would reach), and each sampled
    code's distance to its nearest training code against the same distance of the held-out test codes. A
    sampler that memorises puts its codes much nearer to training codes than held-out data lies;
    `near_copies` counts the samples nearer than the closest 5% of the test codes: a sampler that draws fresh
    codes from the data distribution scores about 5%, one that copies training codes 100%.
    """
    pipe = ev.pipe
    if pipe.latent_denoiser is None or pipe.latent_scheduler is None:
        return {"skipped": "skipped: the pipeline has no latent_denoiser / latent_scheduler"}
    log(f"latent DDIM in z_sem space ({num_samples} samples, T in {list(steps)})")
    denoiser = pipe.latent_denoiser

    def normalize(z_sem: torch.Tensor) -> torch.Tensor:  # in float64 on the CPU, whatever the device
        return denoiser.normalize_z_sem(z_sem.double().to(denoiser.device)).cpu()

    test = normalize(ev.z_sem)
    train = normalize(ev.train_z_sem) if ev.train_data is not None else None
    test_nearest = torch.cdist(test, train).min(dim=1).values if train is not None else None
    copy_radius = test_nearest.quantile(0.05) if train is not None else None  # nearer than 95% of test codes
    generator = torch.Generator().manual_seed(ev.seed + 3)
    rows = []
    for T in steps:
        sampled = normalize(ev.sample_z_sem(num_samples, T, generator))
        row = {"T": T, "frechet_to_test": metrics.fid_from_features(sampled.numpy(), test.numpy())}
        if train is not None:
            nearest = torch.cdist(sampled, train).min(dim=1).values
            row["nearest_train_median"] = nearest.median().item()
            row["near_copies"] = (nearest < copy_radius).double().mean().item()
        rows.append(row)
    out = {"num_samples": num_samples, "num_test_codes": int(test.shape[0]), "rows": rows}
    if train is not None:
        out["num_train_codes"] = int(train.shape[0])
        out["train_frechet_to_test"] = metrics.fid_from_features(train.numpy(), test.numpy())
        out["test_nearest_train_median"] = test_nearest.median().item()
    else:
        out["note"] = "no --train_split: the floor and the nearest-training-code distances are not measured"
    return out


def claims(results: Dict) -> List[Dict]:
    """Appendix C's claim: the latent DDIM does not memorise its training codes."""
    lat = results.get("latent", {})
    if "near_copies" not in (lat.get("rows") or [{}])[0]:
        return []
    return [
        claim(
            "The latent DDIM does not memorise its training codes: its samples lie no nearer to a training code "
            "than held-out codes do (at most 10% nearer than the closest 5% of the test codes)",
            "Appendix C",
            all(r["near_copies"] <= 0.1 for r in lat["rows"]),
            ", ".join(
                f"T={r['T']}: {100 * r['near_copies']:.1f}% near copies, median distance "
                f"{r['nearest_train_median']:.2f} vs {lat['test_nearest_train_median']:.2f} for test codes"
                for r in lat["rows"]
            ),
        )
    ]
