"""Fréchet Inception Distance pieces that need no model: activation statistics (streamed, float64), the Fréchet
distance between two gaussians (pytorch-fid's `calculate_frechet_distance`, its eps-offset retry included),
and reference statistics from an `.npz` (`mu`, `sigma`, the pytorch-fid / upstream `fid_stats_*.npz` layout).

    stats = RunningStats(2048); stats.update(features); mu, sigma = stats.finalize()
    fid = frechet_distance(mu, sigma, ref_mu, ref_sigma)
"""

from __future__ import annotations

import logging
import os

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)


class RunningStats:
    """Mean and covariance (`np.cov`, ddof 1) of feature rows fed in batches: sums in float64, so 30K x 2048
    activations never sit in memory at once and the result equals `np.cov` of them all to ~1e-12."""

    def __init__(self, dim: int):
        self.n = 0
        self.total = np.zeros((dim,), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.total.shape[0]:
            raise ValueError(f"features must be [N, {self.total.shape[0]}], got {x.shape}")
        self.n += x.shape[0]
        self.total += x.sum(0)
        self.outer += x.T @ x

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, (sigma + sigma.T) / 2


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of [N, D] activations, as pytorch-fid's `calculate_activation_statistics`."""
    x = np.asarray(features, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as pytorch-fid: scipy's sqrtm, retried with eps on the
    diagonals when the product is singular, and a small imaginary part (numerical) dropped."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("fid: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"fid: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    """`mu`, `sigma` of a pytorch-fid statistics file (e.g. upstream's fid_stats_mscoco256_val.npz)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found: {path}")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} lacks 'mu' / 'sigma' (keys: {sorted(f.keys())})")
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return path
