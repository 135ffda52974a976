"""Deep CORAL (Sun & Saenko, "Deep CORAL: Correlation alignment for deep domain adaptation", ECCV
2016 workshops) as domain generalisation uses it (DomainBed's CORAL, Gulrajani & Lopez-Paz 2021): a
lever of README's "Models that travel".

Each training batch adds a penalty on how much the training sources' image features (the backbone's
output, what the melanoma head reads) differ in their first two moments: for every pair of sources in
the batch, the mean squared difference of their mean feature vectors plus that of their feature
covariance matrices. Why it might travel: a dermoscope's colour, illumination and grain shift the
features of all its images alike; features whose statistics cannot tell one training source from the
other carry less of what is particular to a dermoscope, and a source not trained on has less to be
different in. The melanoma loss keeps what separates melanomas inside each source.

The penalty is DomainBed's exactly (means and covariances compared entry by entry, averaged over
source pairs), at its default weight 1; it is computed in float32 whatever the training precision (a
covariance is a sum of products). Pure functions; nothing is stored and inference is untouched.
"""

from __future__ import annotations

import torch


def moment_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean((mean(a) - mean(b))^2) + mean((cov(a) - cov(b))^2) for two (N, D) feature sets of at least
    two rows each; cov with the n - 1 divisor (unbiased), as DomainBed's."""
    a, b = a.float(), b.float()
    mean_a, mean_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    ca, cb = a - mean_a, b - mean_b
    cov_a = ca.T @ ca / (len(a) - 1)
    cov_b = cb.T @ cb / (len(b) - 1)
    return (mean_a - mean_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def coral_penalty(features: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The mean `moment_distance` over every pair of groups (training sources) present in the batch with
    at least two images (a covariance needs two); 0 when fewer than two groups qualify. The zero is
    still a function of the features (0 * sum), so the graph is the same whatever the batch holds: DDP
    expects every rank to reach the same parameters."""
    if features.ndim != 2 or groups.shape != features.shape[:1]:
        raise ValueError(f"coral_penalty needs (N, D) features and (N,) groups, got {tuple(features.shape)} and "
                         f"{tuple(groups.shape)}")
    names, counts = torch.unique(groups, return_counts=True)
    members = [features[groups == g] for g in names[counts >= 2]]
    pairs = [moment_distance(members[i], members[j]) for i in range(len(members))
             for j in range(i + 1, len(members))]
    if not pairs:
        return features.float().sum() * 0.0
    return torch.stack(pairs).mean()
