"""What an ε guarantees against reconstruction, beside what the attacks achieve: the risk bounds.

The bound uses the add/remove-one neighbouring relation with Poisson sampling, the relation Opacus' RDP and
PRV accountants assume: riskcal's trade-off curve comes from a dp_accounting privacy-loss distribution built
with its default `NeighborRel.ADD_OR_REMOVE_ONE` (both directions, combined into one symmetric curve), so the
bound and the ε printed beside it describe the same mechanism.

- `reconstruction_bound`: any reconstruction attack against a prior of n equally likely candidates (baseline
  success κ = 1/n) succeeds with probability at most 1 − f(κ), f the mechanism's trade-off curve (Hayes,
  Mahloujifar & Balle 2023; Kulynych et al. 2025). `monte_carlo_bound` is Hayes et al.'s estimator of the same
  quantity, kept to cross-check riskcal in the tests and the benchmark.
The empirical side, the one-run audit's ε lower bound, is in audit.py.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

MIN_NOISE_MULTIPLIER = 0.3  # below it riskcal's grid needs tens of GB (z = 0.05 asked for 44 GB)


@functools.cache
def reconstruction_bound(noise_multiplier: float, sample_rate: float, steps: int, prior_size: int) -> float:
    """Upper bound on the success probability of any reconstruction attack on one training example under
    DP-SGD with noise multiplier z, Poisson rate q and T steps, against a uniform prior of `prior_size`
    candidates: 1 − f(1/n) from riskcal's trade-off curve. One attacked release is q = 1, T = 1."""
    from riskcal.calibration.dpsgd import get_beta_for_dpsgd

    kappa = 1.0 / prior_size
    if noise_multiplier < MIN_NOISE_MULTIPLIER:  # riskcal's privacy-loss grid would not fit in memory
        return 1.0  # the trivial bound, which is all such little noise allows anyway
    beta = get_beta_for_dpsgd(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, num_steps=steps, alpha=np.array([kappa])
    )
    return float(np.clip(1.0 - beta[0], kappa, 1.0))


def poisson_log_likelihood_ratio(x: np.ndarray, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Per step, log of the density ratio of (1 − q)·N(0, z²) + q·N(1, z²) against N(0, z²) at x: how much a
    step's coordinate along a clipped gradient (in units of the clip norm) says that the example was in the
    batch. Computed in log space, so no noise level overflows it."""
    z, q = noise_multiplier, sample_rate
    shift = (2 * np.asarray(x) - 1) / (2 * z**2)
    return np.logaddexp(np.log1p(-q) if q < 1 else -np.inf, np.log(q) + shift)


def monte_carlo_bound(
    noise_multiplier: float, sample_rate: float, steps: int, prior_size: int, samples: int = 100_000, seed: int = 0
) -> tuple[float, float]:
    """Hayes et al.'s Monte Carlo estimate of the same bound, and its standard error. Under the null (target
    absent) each step's coordinate along the target's clipped gradient is N(0, z²); the log-likelihood ratio of
    the Poisson mixture (1 − q)·N(0, z²) + q·N(1, z²) against it is summed over the steps, the most powerful
    test at level κ rejects the top κ of it, and its power 1 − E_null[e^L · 1{L below the cut}] is the bound."""
    rng = np.random.default_rng(seed)
    z, q, kappa = noise_multiplier, sample_rate, 1.0 / prior_size
    losses = np.empty(samples)
    chunk = max(1, 2_000_000 // steps)  # about 16 MB of draws at a time
    for start in range(0, samples, chunk):
        x = rng.normal(0.0, z, size=(min(chunk, samples - start), steps))
        losses[start : start + len(x)] = poisson_log_likelihood_ratio(x, z, q).sum(1)
    cut = np.quantile(losses, 1 - kappa)
    weights = np.where(losses <= cut, np.exp(losses), 0.0)
    return float(1 - weights.mean()), float(weights.std() / math.sqrt(samples))


def _positive(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def run_bounds(row: Mapping[str, Any], prior_size: int) -> dict[str, Any]:
    """A training run's bound columns, for the whole run (its recorded z, q and T): against 10 candidates and
    against `prior_size`. None where the run is not DP-SGD."""
    z, q, steps = row.get("noise_multiplier"), row.get("sample_rate"), row.get("steps")
    dp = _positive(z) and _positive(q) and _positive(steps)
    bound = (lambda n: reconstruction_bound(float(z), float(q), int(steps), n)) if dp else (lambda n: None)
    return {
        "prior_size": prior_size,
        "reconstruction_bound": bound(10),
        "reconstruction_bound_prior": bound(prior_size),
    }


def release_bounds(row: Mapping[str, Any], prior_size: int) -> dict[str, Any]:
    """An attack row's bound columns, for what its attacker observed: one release (q = 1, T = 1: a Gaussian
    mechanism on a batch that certainly holds the target) for the attacks on a shared update, the whole
    training (the row's q and T) for the prior-aware attack, which watches every step. None without DP noise."""
    z, q, steps = row.get("noise_multiplier"), row.get("sample_rate"), row.get("steps")
    q, steps = (float(q), int(steps)) if _positive(q) and _positive(steps) else (1.0, 1)
    bound = (lambda n: reconstruction_bound(float(z), q, steps, n)) if _positive(z) else (lambda n: None)
    return {"prior_size": prior_size, "release_bound": bound(10), "release_bound_prior": bound(prior_size)}
