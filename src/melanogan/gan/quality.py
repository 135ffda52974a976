"""Synthetic-image quality metrics as pure functions of feature tensors (and, for MS-SSIM, images).

With ~500 training melanomas FID alone is biased (it depends on N) and ImageNet features are a
questionable judge of dermoscopy, so several views are offered: FID, KID (unbiased), precision /
recall (k-NN manifolds), density / coverage, diversity by MS-SSIM, and memorisation (nearest
training image). Nearest-neighbour computations are blocked: memory grows linearly with N.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- distribution metrics


def _f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def fid(real, fake) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^1/2).

    tr((S_r S_f)^1/2) is the sum of the square roots of the eigenvalues of S_r S_f. With centred data
    A, B these are the squared singular values of A B^T / sqrt((n_a - 1)(n_b - 1)), so when there are
    fewer samples than dimensions (2048-d features, a few hundred melanomas) an n_a x n_b SVD replaces
    two D x D eigendecompositions; both paths are exact."""
    a, b = _f64(real), _f64(fake)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    na, nb, d = len(a), len(b), a.shape[1]
    tr_a = ca.pow(2).sum() / (na - 1)
    tr_b = cb.pow(2).sum() / (nb - 1)
    if na * nb * min(na, nb) < d**3:
        tr_sqrt = torch.linalg.svdvals(ca @ cb.T).sum() / math.sqrt((na - 1) * (nb - 1))
    else:
        cov_a, cov_b = ca.T @ ca / (na - 1), cb.T @ cb / (nb - 1)
        eva, veca = torch.linalg.eigh(cov_a)
        sqrt_a = (veca * eva.clamp(min=0).sqrt()) @ veca.T
        tr_sqrt = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + tr_a + tr_b - 2 * tr_sqrt
    return float(value.clamp(min=0))


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(real, fake, subset_size: int = 1000, n_subsets: int = 100, seed: int = 0) -> dict[str, float]:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, averaged over
    random subsets (Binkowski et al. 2018). The subset size adapts to small N (min of both sets);
    memory is O(subset_size^2), never O(N^2)."""
    a, b = _f64(real), _f64(fake)
    m = int(min(subset_size, len(a), len(b)))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n_subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        off = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(off - 2 * kxy.mean()))
    v = np.array(values)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "subset_size": m,
            "subsets": n_subsets}


# --------------------------------------------------------------------------- nearest neighbours (blocked)


def _sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ y.T + y.pow(2).sum(1)[None]).clamp(min=0)


def knn_distances(x, y=None, k: int = 1, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Distance to (and index of) the k-th nearest neighbour in `y` of every row of `x` (`y=None`:
    within `x`, excluding the point itself). Blocked: memory O(block * len(y))."""
    xs = _f64(x)
    same = y is None
    ys = xs if same else _f64(y)
    dist = np.empty(len(xs))
    index = np.empty(len(xs), dtype=np.int64)
    for start in range(0, len(xs), block):
        d = _sqdist(xs[start:start + block], ys)
        if same:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        vals, idx = torch.topk(d, k, dim=1, largest=False)
        dist[start:start + block] = vals[:, -1].sqrt().numpy()
        index[start:start + block] = idx[:, -1].numpy()
    return dist, index


def _count_within(x, centres, radii: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each row of x: how many centres have it inside their radius."""
    xs, cs = _f64(x), _f64(centres)
    r2 = torch.as_tensor(radii, dtype=torch.float64) ** 2
    out = np.empty(len(xs), dtype=np.int64)
    for start in range(0, len(xs), block):
        out[start:start + block] = (_sqdist(xs[start:start + block], cs) <= r2[None]).sum(1).numpy()
    return out


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019): precision = share of fakes inside the
    real manifold (union of k-NN balls of real points); recall = share of reals inside the fake one."""
    r_rad, _ = knn_distances(real, k=k)
    f_rad, _ = knn_distances(fake, k=k)
    return {"precision": float((_count_within(fake, real, r_rad) > 0).mean()),
            "recall": float((_count_within(real, fake, f_rad) > 0).mean()), "k": k}


def density_coverage(real, fake, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020): density = mean number of real k-NN balls holding a
    fake, / k (about 1 when matched); coverage = share of real balls holding at least one fake."""
    r_rad, _ = knn_distances(real, k=k)
    density = _count_within(fake, real, r_rad).sum() / (k * len(np.asarray(fake)))
    nn_fake, _ = knn_distances(real, fake, k=1)
    return {"density": float(density), "coverage": float((nn_fake <= r_rad).mean()), "k": k}


def memorisation(train, fake, percentile: float = 1.0) -> dict:
    """Nearest training image of every synthetic one; a synthetic image is flagged as a copy when it
    is closer to its nearest training image than `percentile`% of training images are to theirs."""
    train_nn, _ = knn_distances(train, k=1)
    threshold = float(np.percentile(train_nn, percentile))
    dist, index = knn_distances(fake, train, k=1)
    flagged = dist < threshold
    return {"threshold": threshold, "percentile": percentile, "distance": dist, "nearest": index,
            "flagged": flagged, "share_flagged": float(flagged.mean())}


# --------------------------------------------------------------------------- structural similarity


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    """A 1-D Gaussian, applied separably (rows then columns): 2k instead of k^2 taps per pixel."""
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).expand(channels, 1, 1, size).contiguous()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    ch = x.shape[1]
    x = F.conv2d(x, window, groups=ch)
    return F.conv2d(x, window.transpose(2, 3), groups=ch)


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = 0.01**2, 0.03**2
    # all five local statistics in one grouped convolution pass
    stats = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), window.repeat(5, 1, 1, 1))
    mu_x, mu_y, exx, eyy, exy = stats.chunk(5, dim=1)
    sxx, syy, sxy = exx - mu_x**2, eyy - mu_y**2, exy - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = ((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)) * cs
    return ssim.flatten(1).mean(1), cs.flatten(1).mean(1)


def ssim(x, y) -> torch.Tensor:
    """SSIM per image pair; images (N, C, H, W) in [0, 1] (computed in float32)."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    size = min(11, x.shape[-1])
    return _ssim_parts(x, y, _gaussian_window(size, 1.5, x.shape[1]))[0]


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(x, y) -> torch.Tensor:
    """Multi-scale SSIM (Wang et al. 2003) per image pair, images in [0, 1]. Scales are dropped (and
    the weights renormalised) when the image is too small for five, e.g. 64 px uses three."""
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    size = min(11, x.shape[-1])
    scales = max(1, min(5, int(math.log2(x.shape[-1] / size)) + 1))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32)
    weights = weights / weights.sum()
    window = _gaussian_window(size, 1.5, x.shape[1])
    values = []
    for s in range(scales):
        full, cs = _ssim_parts(x, y, window)
        values.append((full if s == scales - 1 else cs).clamp(min=1e-6))
        if s < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.prod(torch.stack(values, dim=1) ** weights[None], dim=1)


def pairwise_ms_ssim(images, n_pairs: int = 200, seed: int = 0) -> np.ndarray:
    """MS-SSIM of `n_pairs` random distinct pairs from one image set (diversity: lower = more diverse)."""
    images = torch.as_tensor(images)
    n = len(images)
    if n < 2:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n
    return ms_ssim(images[i].float(), images[j].float()).numpy()


# --------------------------------------------------------------------------- conditioning


def label_effect(melanoma, other) -> dict[str, float]:
    """Does the class label change what a conditional generator draws? Row i of `melanoma` and of
    `other` are features (or flattened pixels) of two images drawn from the same noise vector with the
    two labels. `label`: the mean Euclidean distance within those pairs (what the label changes);
    `noise`: the mean distance between images of one class from different noise vectors (each image
    against the next one, i and i+1 mod n, both classes); `ratio`: label / noise.

    Why: near 0, a "synthetic melanoma" and a "synthetic non-melanoma" are the same picture with two
    labels, which teaches a classifier label noise (the original study's constant labels, reached
    another way: the generator ignores them); near 1, the label changes an image as much as a new
    noise vector does. FID per class cannot show this: each class can match its real images' spread
    while the two classes' images are the same ones."""
    mel, oth = _f64(melanoma), _f64(other)
    if mel.ndim != 2 or mel.shape != oth.shape or len(mel) < 2:
        raise ValueError(f"label_effect needs two (n, d) sets of the same shape, n >= 2: got {tuple(mel.shape)} "
                         f"and {tuple(oth.shape)}")
    label = (mel - oth).norm(dim=1).mean()
    noise = torch.cat([(x - x.roll(-1, dims=0)).norm(dim=1) for x in (mel, oth)]).mean()
    return {"label": float(label), "noise": float(noise), "ratio": float(label / noise) if noise > 0 else float("nan")}


# --------------------------------------------------------------------------- skin tone


def skin_tone_shift(real_ita, synthetic_ita) -> dict:
    """Does the generator reproduce the real skin-tone distribution? Two samples of ITA angles
    (NaN = not estimable, counted apart): medians, the two-sample Kolmogorov-Smirnov test, and the
    share of each ITA band in both sets. A GAN trained on few darker-skin images can drop them
    (mode dropping on a minority), which FID over all images would hardly show."""
    from scipy.stats import ks_2samp

    from melanogan.data.skin import ITA_CATEGORIES, ita_category

    real, syn = np.asarray(real_ita, dtype=np.float64), np.asarray(synthetic_ita, dtype=np.float64)
    r, s = real[np.isfinite(real)], syn[np.isfinite(syn)]
    out = {"n_real": len(r), "n_synthetic": len(s), "n_real_unknown": int(len(real) - len(r)),
           "n_synthetic_unknown": int(len(syn) - len(s)),
           "median_real": float(np.median(r)) if len(r) else float("nan"),
           "median_synthetic": float(np.median(s)) if len(s) else float("nan"),
           "ks_statistic": float("nan"), "p_value": float("nan"), "bands": {}}
    if len(r) and len(s):
        test = ks_2samp(r, s)
        out.update(ks_statistic=float(test.statistic), p_value=float(test.pvalue))
    for name, _ in ITA_CATEGORIES:
        out["bands"][name] = {"real": float(np.mean([ita_category(x) == name for x in r])) if len(r) else float("nan"),
                              "synthetic": float(np.mean([ita_category(x) == name for x in s])) if len(s)
                              else float("nan")}
    return out
