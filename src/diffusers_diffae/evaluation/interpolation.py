"""Section 3, interpolation smoothness (paper Appendix F, Eq. 10): perceptual path length along lerp(z_sem) +
slerp(x_T) paths of DiffAE against slerp(x_T) paths of the DDIM baseline; distances in pixel MSE and, when
available, image features and LPIPS."""

from typing import Dict, List

import torch

from ..pipelines.pipeline_diffae import slerp
from . import metrics
from .context import Evaluation, claim, log
from .fid import feature_distance


def path_distances(ev: Evaluation, frames_a: torch.Tensor, frames_b: torch.Tensor) -> Dict[str, List[float]]:
    """Distances (N,) between frames_a and frames_b (N, C, H, W) in every space that can run: pixel MSE always,
    feature distance with a feature network, LPIPS when it loads."""
    out = {"pixel_mse": metrics.mse(frames_a, frames_b).tolist()}
    if ev.features is not None:
        out["inception"] = feature_distance(ev.features(frames_a), ev.features(frames_b)).tolist()
    if ev.lpips is not None:
        out["lpips"] = torch.cat([ev.lpips(frames_a[s], frames_b[s]) for s in ev.batches(len(frames_a))]).tolist()
    return out


def evaluate(ev: Evaluation, steps: int, num_pairs: int = 16, epsilon: float = 1e-2) -> Dict:
    """Path length of `num_pairs` pairs of test images, each at its own t ~ U(0, 1 - epsilon), decoded with `steps`
    DDIM steps."""
    n = ev.data.images.shape[0]
    num_pairs = min(num_pairs, n // 2)
    if num_pairs < 1:
        return {"skipped": "skipped: interpolation needs at least 2 test images"}
    log(f"interpolation ({num_pairs} pairs, T={steps}, epsilon={epsilon})")
    generator = torch.Generator().manual_seed(ev.seed + 1)
    a, b = torch.arange(num_pairs), torch.arange(num_pairs, 2 * num_pairs)
    t = torch.rand(num_pairs, generator=generator, dtype=torch.float64) * (1 - epsilon)
    alphas = torch.stack([t, t + epsilon], 1)  # (P, 2)

    def path_points(codes: torch.Tensor) -> torch.Tensor:  # slerp per pair at its own (t, t + eps): (2P, ...)
        points = [slerp(codes[a[i : i + 1]], codes[b[i : i + 1]], alphas[i])[0] for i in range(num_pairs)]
        return torch.stack(points, 1).flatten(0, 1)  # frames at t first, then t + eps

    z = ev.z_sem.double()
    z_path = torch.cat([torch.lerp(z[a], z[b], alphas[:, j : j + 1]) for j in range(2)]).float()
    diffae = ev.decode(path_points(ev.x_T(steps)), z_path, steps)
    result = {"DiffAE": path_distances(ev, diffae[:num_pairs], diffae[num_pairs:])}
    if ev.baseline is not None:
        base = ev.decode(path_points(ev.baseline_x_T(steps)), None, steps, baseline=True)
        result["DDIM baseline"] = path_distances(ev, base[:num_pairs], base[num_pairs:])
    ppl = {
        model: {space: metrics.perceptual_path_length(d, epsilon) for space, d in dists.items()}
        for model, dists in result.items()
    }
    spaces = {"pixel_mse": "mean squared pixel difference in [0, 1]"}
    if ev.features is not None:
        spaces["inception"] = f"squared L2 of unit-normalised {ev.features_name} features (not LPIPS/VGG16)"
    if ev.lpips is not None:
        spaces["lpips"] = "LPIPS"
    return {
        "num_pairs": num_pairs,
        "epsilon": epsilon,
        "T": steps,
        "protocol": "PPL = E[d(G(p(t)), G(p(t + eps))) / eps^2], t ~ U(0, 1 - eps); DiffAE path: lerp z_sem, slerp "
        "inverted x_T; baseline path: slerp inverted x_T; 1st/99th percentile trimming as StyleGAN",
        "distance_spaces": spaces,
        "feature_space_note": None if ev.features is not None else ev.features_reason,
        "ppl": ppl,
    }


def claims(results: Dict) -> List[Dict]:
    """Appendix F's claim: DiffAE's interpolation paths are smoother than DDIM's."""
    ppl = results.get("interpolation", {}).get("ppl", {})
    if "DiffAE" not in ppl or "DDIM baseline" not in ppl:
        return []
    spaces = [s for s in ppl["DiffAE"] if s in ppl["DDIM baseline"]]
    return [
        claim(
            "Interpolation is smoother with DiffAE than with DDIM (lower path length)",
            "Appendix F: PPL 613.73 vs 2,634.14",
            all(ppl["DiffAE"][s] < ppl["DDIM baseline"][s] for s in spaces),
            "; ".join(f"{s}: {ppl['DiffAE'][s]:.4g} vs {ppl['DDIM baseline'][s]:.4g}" for s in spaces),
        )
    ]
