"""Quality metrics on feature tensors: exact values on constructed cases, milliseconds each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from melanogan.gan import quality as Q


def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    """Independent reference: the classic pytorch-fid formula with scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def test_fid_zero_for_identical_and_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    assert Q.fid(a, a) == pytest.approx(0.0, abs=1e-8)
    b = rng.normal(0.5, 1.3, size=(250, 16))
    assert Q.fid(a, b) == pytest.approx(_fid_scipy(a, b), rel=1e-6)
    # closed form for 1-d Gaussians: (mu1-mu2)^2 + (s1 - s2)^2
    x = np.array([[-1.0], [1.0]] * 50)
    y = x * 2 + 3
    assert Q.fid(x, y) == pytest.approx(9 + (np.std(x, ddof=1) - np.std(y, ddof=1)) ** 2)


def test_kid_is_unbiased_on_the_same_distribution_and_positive_otherwise():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = Q.kid(a, b, subset_size=100, n_subsets=50)
    assert abs(same["mean"]) < 3 * same["std"] / np.sqrt(50) + 1e-3
    diff = Q.kid(a, rng.normal(1.0, 1.0, size=(400, 8)), subset_size=100, n_subsets=50)
    assert diff["mean"] > 10 * abs(same["mean"]) and diff["mean"] > 0
    small = Q.kid(a[:30], b[:20])
    assert small["subset_size"] == 20  # adapts to small N


def test_precision_recall_density_coverage_constructed_cases():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 4))
    same = Q.precision_recall(real, real.copy())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    dc = Q.density_coverage(real, real.copy())
    assert dc["coverage"] == 1.0 and dc["density"] == pytest.approx(1.0, abs=0.15)
    far = real + 100
    assert Q.precision_recall(real, far) == {"precision": 0.0, "recall": 0.0, "k": 3}
    assert Q.density_coverage(real, far)["coverage"] == 0.0
    collapsed = np.repeat(real[:1], 50, axis=0) + rng.normal(0, 1e-3, (50, 4))  # one mode only
    pr = Q.precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.1
    assert Q.density_coverage(real, collapsed)["coverage"] < 0.1


def test_knn_is_blocked_and_exact():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 3))
    d, i = Q.knn_distances(x, k=1, block=7)
    full = np.linalg.norm(x[:, None] - x[None], axis=2)
    np.fill_diagonal(full, np.inf)
    assert np.allclose(d, full.min(1)) and (i == full.argmin(1)).all()


def test_memorisation_flags_copies_not_new_images():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(300, 10))
    fake = np.stack([train[5], train[17] + rng.normal(0, 0.01, 10), rng.normal(size=10) * 3 + 5])
    m = Q.memorisation(train, fake)
    assert m["flagged"].tolist() == [True, True, False]
    assert m["nearest"][:2].tolist() == [5, 17]
    assert m["share_flagged"] == pytest.approx(2 / 3)


def test_ssim_and_ms_ssim():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    assert torch.allclose(Q.ssim(x, x), torch.ones(3), atol=1e-5)
    assert torch.allclose(Q.ms_ssim(x, x), torch.ones(3), atol=1e-5)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(0, 1)
    assert (Q.ms_ssim(x, noisy) < 0.9).all()
    same = Q.pairwise_ms_ssim(x[:1].repeat(10, 1, 1, 1), n_pairs=20)
    diverse = Q.pairwise_ms_ssim(torch.rand(10, 3, 64, 64), n_pairs=20)
    assert same.mean() > 0.99 > diverse.mean()


def test_fid_both_algorithms_agree():
    """The low-rank SVD path (N < D) and the eigendecomposition path give the same value."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(40, 60)), rng.normal(0.2, 1.1, size=(30, 60))  # N < D: SVD path
    assert Q.fid(a, b) == pytest.approx(_fid_scipy(a, b), rel=1e-6)
    c, d = rng.normal(size=(500, 6)), rng.normal(0.3, 0.9, size=(400, 6))  # N > D: eigh path
    assert Q.fid(c, d) == pytest.approx(_fid_scipy(c, d), rel=1e-6)


@pytest.mark.parametrize(("n", "dim"), [(80, 16), (20, 64)])  # more samples than dimensions, and fewer
def test_fid_equals_torch_fidelity_on_the_same_features(n, dim):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, dim))
    b = rng.normal(0.3, 1.2, size=(n + 7, dim))
    theirs = fid_statistics_to_metric(fid_features_to_statistics(torch.as_tensor(a)),
                                      fid_features_to_statistics(torch.as_tensor(b)), verbose=False)
    assert Q.fid(a, b) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)


def test_fid_of_identical_sets_is_zero_and_ms_ssim_matches_pytorch_msssim():
    from pytorch_msssim import ms_ssim

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8))
    assert Q.fid(feats, feats) == pytest.approx(0.0, abs=1e-8)
    # MS-SSIM at a size both support (5 scales, 11 px Gaussian window: > 160 px)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 176, 176, generator=g)
    y = (x + 0.1 * torch.randn(2, 3, 176, 176, generator=g)).clamp(0, 1)
    ours = Q.ms_ssim(x, y)
    reference = ms_ssim(x, y, data_range=1.0, size_average=False)
    assert torch.allclose(ours.float(), reference.float(), atol=1e-4), (ours, reference)


def test_skin_tone_shift_exact_on_constructed_angles():
    real = [60.0, 45.0, 30.0, 20.0, 0.0, -40.0, float("nan")]
    same = Q.skin_tone_shift(real, real)
    assert same["ks_statistic"] == 0.0 and same["p_value"] == 1.0 and same["n_real_unknown"] == 1
    assert same["median_real"] == same["median_synthetic"] == 25.0
    # a generator that dropped the darker half: only the light angles
    dropped = Q.skin_tone_shift(real, [60.0, 58.0, 45.0, 44.0, 50.0, 47.0])
    assert dropped["ks_statistic"] == pytest.approx(4 / 6)  # the ECDFs differ most just above 30
    assert dropped["bands"]["dark"] == {"real": pytest.approx(1 / 6), "synthetic": 0.0}
    assert dropped["bands"]["very light"] == {"real": pytest.approx(1 / 6), "synthetic": pytest.approx(2 / 6)}
    assert dropped["n_synthetic_unknown"] == 0


def test_label_effect_exact_on_constructed_pairs():
    # each "melanoma" is its noise twin shifted by (1, 0): the label moves every image by exactly 1;
    # the noise moves them by 5, 5 and 10 (next image, wrapping round) in both classes
    other = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    melanoma = other + np.array([1.0, 0.0])
    out = Q.label_effect(melanoma, other)
    assert out["label"] == pytest.approx(1.0) and out["noise"] == pytest.approx(20 / 3)
    assert out["ratio"] == pytest.approx(0.15)
    # a generator that ignores the label: the pairs are the same picture
    assert Q.label_effect(other, other)["ratio"] == 0.0
    for mel, oth in ((other[:1], other[:1]), (other[:2], other)):  # one pair; unpaired sets
        with pytest.raises(ValueError, match="same shape, n >= 2"):
            Q.label_effect(mel, oth)
