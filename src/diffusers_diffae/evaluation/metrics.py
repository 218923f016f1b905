"""Metrics for the paper's quantitative claims, written to be checked by hand.

Paper map: reconstruction MSE / PSNR / SSIM (§5.4, Tables 1-2) -> `mse`, `psnr`, `ssim`; linear-probe AUROC
(Appendix E, Table 8) -> `auroc`, `linear_probe_scores`; FID (§5.6-5.7, Tables 3-4, Appendix G Table 9) ->
`frechet_distance`, `fid_from_features`; perceptual path length (Appendix F, Eq. 10) -> `perceptual_path_length`;
manipulation quality (Appendix G) -> `pixel_change`.

Images are `(B, C, H, W)` tensors in [0, 1] unless stated otherwise; per-image functions return `(B,)`.
"""

import importlib
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _optional(module: str, metric: str, package: str):
    """Imports an optional dependency of the `metrics` extra, or says which package the metric needs."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{metric} needs the {package} package: pip install 'diffusers-diffae[metrics]' (or {package})"
        ) from e


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {shape}")
    if x.shape != y.shape:
        raise ValueError(f"image batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction (paper §5.4)
# ---------------------------------------------------------------------------------------------------------------


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image, averaged over C, H, W. x, y: (B, C, H, W). Returns (B,)."""
    _check_pair(x, y)
    return (x.double() - y.double()).pow(2).flatten(1).mean(1).float()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, min_mse: float = 1e-10) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: `10 log10(data_range^2 / MSE)`. Returns (B,).

    `min_mse` caps identical images at a finite value (100 dB for data_range 1) so that averages stay finite.
    """
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    return 10 * torch.log10(data_range**2 / mse(x, y).double().clamp_min(min_mse)).float()


def ssim(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11, zero_padding: bool = False
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004; 11x11 Gaussian window, sigma 1.5) from pytorch-msssim.

    Returns (B,): the SSIM map averaged over C, H, W. Needs `pip install pytorch-msssim` (the `metrics` extra).

    - `zero_padding=False` (most libraries' SSIM: pytorch-msssim, scikit-image): the window only visits positions
      where it lies inside the image, so images must be at least `win_size` pixels wide and high.
    - `zero_padding=True`: **the official DiffAE protocol**, behind the paper's SSIM numbers (Tables 1-2):
      phizaz/diffae `ssim.py` (Po-Hsun Su's pytorch_ssim), called by `metrics.evaluate_lpips`, convolves with
      `padding=win // 2`, so the window also visits border pixels with zeros outside the image, and the map is
      averaged over all H x W positions. Padding both images with zeros and taking the valid map is the same
      computation, which lets pytorch-msssim do it. The zeros give both images a large local variance and covariance
      at the borders, which pushes SSIM there toward 1: the smaller the image, the higher the score
      (`docs/results/` reports both). Compare with the paper's numbers only with `zero_padding=True`.
    """
    _check_pair(x, y)
    _ssim = _optional("pytorch_msssim", "SSIM", "pytorch-msssim").ssim
    if win_size % 2 == 0 or win_size < 3:
        raise ValueError(f"win_size must be an odd number >= 3, got {win_size}")
    x, y = x.float(), y.float()
    if zero_padding:
        pad = [win_size // 2] * 4
        x, y = F.pad(x, pad), F.pad(y, pad)
    elif min(x.shape[-2:]) < win_size:
        raise ValueError(
            f"SSIM with an {win_size}x{win_size} window needs images of at least {win_size} pixels per side, got "
            f"{tuple(x.shape[-2:])}; pass a smaller odd win_size or zero_padding=True"
        )
    return _ssim(x, y, data_range=data_range, size_average=False, win_size=win_size).float()


def pixel_change(
    before: torch.Tensor, after: torch.Tensor, threshold: float = 0.1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """How much an edit touches the image: mean absolute change per image, and the fraction of pixels whose largest
    channel change exceeds `threshold` (on the [0, 1] scale). before, after: (B, C, H, W). Returns two (B,)."""
    _check_pair(before, after)
    delta = (after.float() - before.float()).abs()
    changed = (delta.amax(dim=1) > threshold).float().flatten(1).mean(1)
    return delta.flatten(1).mean(1), changed


def reconstruction_scores(
    pred: torch.Tensor, target: torch.Tensor, ssim_win_size: int = 11
) -> Dict[str, torch.Tensor]:
    """The reconstruction metrics of one batch, per image: pred, target (B, C, H, W) in [0, 1] -> {"mse", "psnr",
    "ssim" (a `ssim_win_size` window inside the image), "ssim_official" (zero-padded 11x11, the paper's
    protocol)}, each (B,). Raises ImportError without pytorch-msssim."""
    return {
        "mse": mse(pred, target),
        "psnr": psnr(pred, target),
        "ssim": ssim(pred, target, win_size=ssim_win_size),
        "ssim_official": ssim(pred, target, zero_padding=True),
    }


# ---------------------------------------------------------------------------------------------------------------
# Representation quality (Appendix E)
# ---------------------------------------------------------------------------------------------------------------


def as_binary_labels(labels, name: str = "labels") -> np.ndarray:
    """Binary labels (N,) as int64 0/1: booleans and 0/1 numbers pass, anything else is a ValueError."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.dtype == bool:
        return y.astype(np.int64)
    values = set(np.unique(y).tolist())
    if not values <= {0, 1}:
        shown = sorted(values, key=str)[:6]
        raise ValueError(f"{name} must be binary (0/1 or bool), got values {shown}")
    return y.astype(np.int64)


def auroc(scores, labels) -> float:
    """Area under the ROC curve from the Mann-Whitney U statistic; ties count one half.

    `AUROC = (sum of positive ranks - P (P + 1) / 2) / (P N)`: the probability that a random positive scores
    higher than a random negative. scores: (N,), labels: (N,) binary.
    """
    y = as_binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape} vs {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _optional("scipy.stats", "AUROC", "scipy").rankdata(s)  # 1-based; ties share their average rank
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fit_logistic_probe(
    features: torch.Tensor,
    labels,
    l2: float = 1e-3,
    max_iter: int = 200,
    standardize: bool = True,
    class_balanced: bool = False,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fits a linear classifier (logistic regression) on features (N, D), as the paper's probes (Appendix E) and
    its few-shot heads on normalised z_sem (§5.6).

    Minimises mean BCE + `l2 * |w|^2` with L-BFGS in `dtype`; the penalty keeps the optimum finite when the classes
    are separable (always the case when D >= N, e.g. for x_T or pixels). `standardize` z-normalises each feature
    with the training mean and std first; `class_balanced` weighs the positives by `negatives / positives`.
    Returns `(w (D,), b (), mean (D,), std (D,))`; the score of `f` is `((f - mean) / std) @ w + b` (mean 0 and
    std 1 without `standardize`).
    """
    # Not sklearn's LogisticRegression: same loss, another stopping point (bundled emoji probe AUROC 0.697 vs 0.694).
    y = torch.as_tensor(as_binary_labels(labels), dtype=dtype)
    x = torch.as_tensor(features).reshape(len(y), -1).to(dtype)
    if x.shape[0] < 2:
        raise ValueError("a linear probe needs at least 2 training examples")
    if standardize:
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        x = (x - mean) / std
    else:
        mean, std = x.new_zeros(x.shape[1]), x.new_ones(x.shape[1])
    pos_weight = (y == 0).sum() / y.sum().clamp_min(1) if class_balanced else None
    w = torch.zeros(x.shape[1], dtype=dtype, requires_grad=True)
    b = torch.zeros((), dtype=dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, y, pos_weight=pos_weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach(), mean, std


def probe_scores(features: torch.Tensor, probe) -> torch.Tensor:
    """Logits (N,) of a probe from `fit_logistic_probe` on features (N, ...), in the probe's dtype."""
    w, b, mean, std = probe
    x = torch.as_tensor(features).reshape(features.shape[0], -1).to(w.dtype)
    return ((x - mean) / std) @ w + b


def _group_folds(y: np.ndarray, groups, num_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold index (N,) per example that keeps every group in one fold: groups holding a positive are dealt
    round-robin after a seeded shuffle, then the others, so the positives spread over the folds."""
    # Not sklearn's GroupKFold: other folds, other grouped AUROCs (bundled emoji: 0.620 vs 0.715 for is_woman).
    groups = np.asarray(groups)
    if groups.shape != y.shape:
        raise ValueError(f"groups must have one entry per example ({len(y)}), got shape {groups.shape}")
    names, index = np.unique(groups, return_inverse=True)
    has_positive = np.bincount(index, weights=y, minlength=len(names)) > 0
    group_fold = np.empty(len(names), dtype=np.int64)
    dealt = 0
    for members in (np.flatnonzero(has_positive), np.flatnonzero(~has_positive)):
        members = rng.permutation(members)
        group_fold[members] = (dealt + np.arange(len(members))) % num_folds
        dealt += len(members)
    return group_fold[index]


def linear_probe_scores(
    features: torch.Tensor, labels, num_folds: int = 5, seed: int = 0, l2: float = 1e-3, groups=None
) -> np.ndarray:
    """Out-of-fold logits of a k-fold cross-validated linear probe. features: (N, ...), labels: (N,). Returns (N,).

    Folds are stratified (positives and negatives are dealt round-robin after a seeded shuffle), so every fold
    sees both classes whenever each class has at least `num_folds` members. With `groups` (N,), whole groups are
    dealt instead (see `_group_folds`), for data with near-copies of one example.
    """
    y = as_binary_labels(labels)
    n = len(y)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if min(int(y.sum()), int(n - y.sum())) < num_folds:
        raise ValueError(
            f"each class needs at least num_folds={num_folds} examples for cross-validation, got "
            f"{int(y.sum())} positives and {int(n - y.sum())} negatives"
        )
    rng = np.random.default_rng(seed)
    if groups is not None:
        fold = _group_folds(y, groups, num_folds, rng)
        for k in range(num_folds):
            train = y[fold != k]
            if len(train) == 0 or (fold == k).sum() == 0 or train.min() == train.max():
                raise ValueError(
                    f"grouped cross-validation: fold {k} is empty or leaves one class out of training; "
                    f"{len(np.unique(groups))} groups with {int(y.sum())} positives are too few for {num_folds} folds"
                )
    else:
        fold = np.empty(n, dtype=np.int64)
        for cls in (0, 1):
            members = rng.permutation(np.flatnonzero(y == cls))
            fold[members] = np.arange(len(members)) % num_folds
    x = torch.as_tensor(features).reshape(n, -1)
    scores = np.empty(n, dtype=np.float64)
    for k in range(num_folds):
        train, test = fold != k, fold == k
        probe = fit_logistic_probe(x[torch.from_numpy(train)], y[train], l2=l2)
        scores[test] = probe_scores(x[torch.from_numpy(test)], probe).numpy()
    return scores


def linear_probe_auroc(
    features: torch.Tensor, labels, num_folds: int = 5, seed: int = 0, l2: float = 1e-3, groups=None
) -> float:
    """AUROC of the pooled out-of-fold scores of a cross-validated linear probe (see `linear_probe_scores`)."""
    scores = linear_probe_scores(features, labels, num_folds=num_folds, seed=seed, l2=l2, groups=groups)
    return auroc(scores, labels)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance (FID when the features are Inception-v3 pool features)
# ---------------------------------------------------------------------------------------------------------------


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (N, D) with N >= 2, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    `|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`.

    `tr((s1 s2)^(1/2))` is computed as `tr((s1^(1/2) s2 s1^(1/2))^(1/2))`: the two matrices are similar, and the
    second is symmetric positive semi-definite, so an eigen-decomposition gives it without the complex round-off
    that a general matrix square root produces for rank-deficient covariances (N < D).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"inconsistent statistics: means {mu1.shape} / {mu2.shape}, covariances {sigma1.shape} / {sigma2.shape}"
        )
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid_from_features(features_a, features_b) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    Equal to `frechet_distance(*feature_statistics(a), *feature_statistics(b))`, computed without D x D matrices:
    with centred features A (N_a, D) and B (N_b, D), `sigma_a = A^T A / (N_a - 1)`, and the non-zero eigenvalues
    of `sigma_a sigma_b` are those of `(A B^T)(A B^T)^T / ((N_a - 1)(N_b - 1))`, so `tr((sigma_a sigma_b)^(1/2))`
    is the sum of the singular values of `A B^T` over `sqrt((N_a - 1)(N_b - 1))`. For 2048-d Inception features
    and a few hundred images this is an (N_a, N_b) SVD instead of two 2048 x 2048 eigen-decompositions.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    for name, f in (("features_a", a), ("features_b", b)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"{name} contain NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    ca, cb = a - a.mean(0), b - b.mean(0)
    scale_a, scale_b = a.shape[0] - 1, b.shape[0] - 1
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(scale_a * scale_b)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ca * ca).sum() / scale_a + (cb * cb).sum() / scale_b - 2 * trace_sqrt)


# ---------------------------------------------------------------------------------------------------------------
# Interpolation smoothness (Appendix F)
# ---------------------------------------------------------------------------------------------------------------


def perceptual_path_length(
    distances, epsilon: float, trim_percentiles: Optional[Sequence[float]] = (1.0, 99.0)
) -> float:
    """Perceptual path length (StyleGAN; paper Eq. 10): `E[d(G(path(t)), G(path(t + eps))) / eps^2]`.

    distances: (N,) distances `d` between the images decoded at `t` and `t + eps`. Like StyleGAN's reference
    implementation, values outside the given percentiles are dropped before averaging (`None` keeps all).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    if d.size == 0 or not np.isfinite(d).all():
        raise ValueError("distances must be a non-empty array of finite values")
    values = d / epsilon**2
    if trim_percentiles is not None:
        low, high = trim_percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"trim_percentiles must satisfy 0 <= low < high <= 100, got {trim_percentiles}")
        lo = np.percentile(values, low, method="lower")
        hi = np.percentile(values, high, method="higher")
        values = values[(values >= lo) & (values <= hi)]
    return float(values.mean())
