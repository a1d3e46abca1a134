"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023, *Privacy Auditing with One (1) Training Run*):
`train.py --audit-canaries M` trains with M white-box gradient canaries, each a member with probability 1/2,
and turns the server's membership guesses into an ε lower bound at 95 % confidence, printed beside the
accountant's ε. The threat model is the federated server's: it sees every noisy update.

A canary is a Dirac gradient C·e_j on its own random coordinate j of the trainable parameters. A member is
drawn into each step's batch with the Poisson rate q, like every training example, so the accountant's ε
covers it; under DP-SGD its gradient joins the clipped sum before Opacus adds the noise. The server scores each
canary by the Poisson mixture's log-likelihood ratio of what it saw on that coordinate over all steps (the sum
of the coordinate where there is no noise) and guesses "member" for the k highest scores and "non-member" for
the k lowest. The guesses are tried for a few k fixed in advance, with the confidence split among them (a
union bound), so choosing the best k cannot inflate the bound.

If the bound ever exceeds the accountant's ε, the audit or the accounting is wrong: that is what it is for.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats

from risk import poisson_log_likelihood_ratio
from utils import UsageError

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)  # k / M tried, the confidence split among them


def audit_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability that an (ε, δ)-DP training run lets `correct` of `guesses` membership guesses on `canaries`
    canaries (each a member with probability 1/2) come out right, or more (Steinke et al. 2023, Theorem 5.2):
    a binomial tail at p = e^ε / (1 + e^ε), plus δ's share."""
    p = 1 / (1 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, p))
    pmf = stats.binom.pmf(correct - np.arange(1, correct + 1), guesses, p)
    delta_share = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1))) if correct else 0.0
    return min(tail + delta_share * delta * 2 * canaries, 1.0)


def audit_epsilon(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε the audit rejects at `confidence`: the run is not (ε, δ)-DP for any smaller ε, with that
    confidence. 0 when the guesses are no better than chance allows."""
    level = 1 - confidence
    if guesses == 0 or audit_p_value(canaries, guesses, correct, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(canaries, guesses, correct, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(50):
        middle = (low + high) / 2
        if audit_p_value(canaries, guesses, correct, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def guess_audit(scores: np.ndarray, members: np.ndarray, delta: float, confidence: float = 0.95) -> dict:
    """The ε lower bound from canary scores: for each k of GUESS_FRACTIONS, "member" for the k highest and
    "non-member" for the k lowest; the best k's bound at the split confidence, with its guesses."""
    order = np.argsort(scores)
    level = (1 - confidence) / len(GUESS_FRACTIONS)
    best = {"audit_epsilon": 0.0, "audit_guesses": 0, "audit_correct": 0}
    for fraction in GUESS_FRACTIONS:
        k = max(1, int(fraction * len(scores)))
        correct = int(members[order[-k:]].sum() + (~members[order[:k]]).sum())
        eps = audit_epsilon(len(scores), 2 * k, correct, delta, 1 - level)
        if eps > best["audit_epsilon"]:
            best = {"audit_epsilon": eps, "audit_guesses": 2 * k, "audit_correct": correct}
    return best


class GradientCanaries:
    """M Dirac gradient canaries on distinct random coordinates of `params`; `members` says which were drawn
    into the training set. `add` puts the members drawn into this step's batch into the gradients; `observe`
    records what the server sees on each canary's coordinate."""

    def __init__(self, params: list[torch.Tensor], count: int, clip: float, sample_rate: float, seed: int) -> None:
        sizes = [p.numel() for p in params]
        if count > sum(sizes):
            raise UsageError(
                f"--audit-canaries {count}: each canary needs its own trainable coordinate and the model has "
                f"{sum(sizes)}; use at most that many."
            )
        rng = np.random.default_rng(seed)
        flat = rng.choice(sum(sizes), size=count, replace=False)
        starts = np.cumsum([0, *sizes])
        self.tensor = np.searchsorted(starts, flat, side="right") - 1  # which parameter holds each canary
        self.offset = flat - starts[self.tensor]
        self.members = rng.random(count) < 0.5
        self.clip, self.sample_rate, self.rng = clip, sample_rate, rng
        self.seen: list[np.ndarray] = []  # one row per step: each canary's coordinate, in units of C

    def add(self, grads: list[torch.Tensor], scale: float = 1.0) -> None:
        """Add C·scale on the coordinate of every member this step's Poisson draw includes."""
        drawn = self.members & (self.rng.random(len(self.members)) < self.sample_rate)
        for i in np.flatnonzero(drawn):
            grads[self.tensor[i]].view(-1)[self.offset[i]] += self.clip * scale

    def observe(self, grads: list[torch.Tensor], scale: float = 1.0) -> None:
        """Record each canary's coordinate of the gradients the server receives, divided by C·scale."""
        values = [g.detach().reshape(-1)[torch.as_tensor(self.offset[self.tensor == t])] for t, g in enumerate(grads)]
        row = np.empty(len(self.members))
        for t, v in enumerate(values):
            row[self.tensor == t] = v.cpu().double().numpy()
        self.seen.append(row / (self.clip * scale))

    def scores(self, noise_multiplier: float) -> np.ndarray:
        """Each canary's evidence of membership: the log-likelihood ratio of the Poisson mixture
        (1 − q)·N(0, z²) + q·N(1, z²) against N(0, z²), summed over steps; without noise, the plain sum."""
        seen = np.asarray(self.seen)
        if not noise_multiplier:
            return seen.sum(0)
        return poisson_log_likelihood_ratio(seen, noise_multiplier, self.sample_rate).sum(0)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Under DP-SGD (an Opacus DPOptimizer): the members drawn join the clipped sum before Opacus adds its
        noise, and the server sees the noisy sum, before it is divided by the batch size."""
        add_noise = optimizer.add_noise

        def noisy_sum_with_canaries() -> None:
            self.add([p.summed_grad for p in optimizer.params])
            add_noise()
            self.observe([p.grad for p in optimizer.params])

        optimizer.add_noise = noisy_sum_with_canaries

    def plain_step(self, params: list[torch.Tensor], batch_size: int) -> None:
        """Without DP-SGD: the members drawn join the batch's mean gradient, which the server sees as it is."""
        grads = [p.grad for p in params]
        self.add(grads, 1 / batch_size)
        self.observe(grads, 1 / batch_size)

    def audit(self, noise_multiplier: float, delta: float) -> dict:
        """The one-run audit of this training: ε lower bound at 95 % confidence and the guesses behind it."""
        return {"audit_canaries": len(self.members), **guess_audit(self.scores(noise_multiplier), self.members, delta)}
