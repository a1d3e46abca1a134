"""The prior-aware reconstruction attack (Hayes, Mahloujifar & Balle 2023): the informed adversary of the DP
definition, whose success the reconstruction bound (risk.py) caps and, where gradients are worst-case, meets.

Unlike the other attacks it does not invert one shared update. It knows every training example but the
target, the model at every step, which known examples each step drew, and a prior of n candidates one of which
is the target (chosen uniformly). It watches DP-SGD train (Poisson rate q, clip C, noise z·C, T steps) and
scores each candidate by the likelihood that its clipped gradient hides in what each noisy sum leaves once the
known examples' clipped gradients are taken out: per step log((1 − q) + q·exp((⟨g_i, r_t⟩ − ‖g_i‖²/2) / σ²)),
the Poisson mixture's likelihood ratio, summed over the steps. Its guess is the best-scoring candidate. With
this score the attack is the Bayes-optimal guess given the transcript, so what it misses the bound allows only
for gradients less aligned to the worst case than the bound assumes.

`prior_aware_success` runs the trials and gives the success rate with its 95 % Clopper–Pearson interval beside
the bound for the same z, q, T and n. The noise multiplier comes from the same accountant as training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import binomtest
from torch.func import functional_call, grad, vmap

from privacy import noise_multiplier_for
from risk import reconstruction_bound


@dataclass(frozen=True)
class PriorAwareSetting:
    """One DP-SGD training the adversary watches, and its prior."""

    epsilon: float  # the training run's ε (the accountant finds z for q and T)
    prior_size: int = 10  # n candidates, the target among them: baseline success 1/n
    sample_rate: float = 0.1  # Poisson rate q of every example, the target's included
    steps: int = 100  # T
    max_grad_norm: float = 1.0  # C
    lr: float = 0.5
    delta: float = 1e-5
    accountant: str = "prv"


def clipped_gradients(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-example gradients of the cross-entropy, flattened (N, P) and clipped to norm `clip`, as DP-SGD
    clips them."""

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], 1)
    return flat * (clip / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


def prior_aware_trial(
    model: nn.Module,
    known: tuple[torch.Tensor, torch.Tensor],
    prior: tuple[torch.Tensor, torch.Tensor],
    target: int,
    setting: PriorAwareSetting,
    noise_multiplier: float,
    generator: torch.Generator,
) -> int:
    """One DP-SGD training on the known examples plus prior[target]; the adversary's guess of the target."""
    q, clip = setting.sample_rate, setting.max_grad_norm
    sigma = noise_multiplier * clip
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    expected_batch = q * (len(known[0]) + 1)
    scores = torch.zeros(len(prior[0]), dtype=torch.float64)
    offsets = np.cumsum([0] + [p.numel() for p in params.values()])
    for _ in range(setting.steps):
        drawn = torch.rand(len(known[0]), generator=generator) < q
        candidates = clipped_gradients(model, params, *prior, clip)  # the adversary's side: every candidate
        known_sum = (
            clipped_gradients(model, params, known[0][drawn], known[1][drawn], clip).sum(0) if drawn.any() else 0.0
        )
        noise = torch.randn(candidates.shape[1], generator=generator) * sigma
        target_in = bool(torch.rand((), generator=generator) < q)
        released = known_sum + noise + (candidates[target] if target_in else 0.0)
        residual = released - known_sum  # what the adversary cannot explain by the examples it knows
        shift = (candidates @ residual - candidates.pow(2).sum(1) / 2).double() / sigma**2
        scores += torch.logaddexp(torch.tensor(math.log1p(-q)), math.log(q) + shift) if q < 1 else shift
        step = released / expected_batch
        params = {
            k: p - setting.lr * step[offsets[i] : offsets[i + 1]].view_as(p) for i, (k, p) in enumerate(params.items())
        }
    return int(scores.argmax())


def prior_aware_success(
    make_model,
    known: tuple[torch.Tensor, torch.Tensor],
    pool: tuple[torch.Tensor, torch.Tensor],
    setting: PriorAwareSetting,
    trials: int,
    seed: int = 0,
) -> dict:
    """`trials` independent trainings, each from a fresh model (`make_model()`), a fresh prior of n examples
    drawn from `pool` and a uniform target among them: the success rate, its 95 % Clopper–Pearson interval, and
    the bound on any attack for the same z, q, T and n."""
    z = noise_multiplier_for(setting.epsilon, setting.delta, setting.sample_rate, setting.steps, setting.accountant)
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for _ in range(trials):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
        model = make_model()
        chosen = torch.randperm(len(pool[0]), generator=generator)[: setting.prior_size]
        target = int(torch.randint(0, setting.prior_size, (), generator=generator))
        prior = (pool[0][chosen], pool[1][chosen])
        hits += prior_aware_trial(model, known, prior, target, setting, z, generator) == target
    interval = binomtest(hits, trials).proportion_ci(confidence_level=0.95, method="exact")
    return {
        "epsilon": setting.epsilon, "noise_multiplier": z, "sample_rate": setting.sample_rate, "steps": setting.steps,
        "prior_size": setting.prior_size, "trials": trials, "success_rate": hits / trials,
        "success_low": interval.low, "success_high": interval.high,
        "bound": reconstruction_bound(z, setting.sample_rate, setting.steps, setting.prior_size),
    }  # fmt: skip
