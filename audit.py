"""The one-run privacy audit: `train.py --audit-canaries M` trains with M white-box gradient canaries, each a
member with probability 1/2, and turns the server's membership guesses into two ε lower bounds at 95 %
confidence, printed beside the accountant's ε. The threat model is the federated server's: it sees every noisy
update.

A canary is a Dirac gradient C·e_j on its own random coordinate j of the trainable parameters. A member is
drawn into each step's batch with the Poisson rate q, like every training example, so the accountant's ε
covers it; under DP-SGD its gradient joins the clipped sum before Opacus adds the noise. The server scores each
canary by the Poisson mixture's log-likelihood ratio of what it saw on that coordinate over all steps (the sum
of the coordinate where there is no noise) and guesses "member" for the k highest scores and "non-member" for
the k lowest. The guesses are tried for a few k fixed in advance, with the confidence split among them (a
union bound), so choosing the best k cannot inflate either bound. Both bounds read the same guesses:

- `guess_audit` (Steinke, Nasr & Jagielski 2023, *Privacy Auditing with One (1) Training Run*): the largest ε
  for which no (ε, δ)-DP training could make that many guesses right with probability 5 % or more.
- `fdp_audit` (Mahloujifar, Melis & Chaudhuri 2025, *Auditing f-DP in One Run*): the same question asked of
  each member of a family of trade-off curves f, through the paper's recursive bound on how many of r guesses an
  f-DP mechanism can get right. The family is the run's own mechanism, DP-SGD with its q and T, by noise
  multiplier z (riskcal's curves from dp_accounting); the guesses reject every z ≥ z*, and the bound is the
  accountant's ε of z*. It reads: "if this run is DP-SGD with this q and T, its ε is at least this". It sees
  the bulk of the curve, where the guesses are, and the family carries that to δ, which is why it is tighter.

If a bound ever exceeds the accountant's ε, the audit or the accounting is wrong: that is what it is for.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np
import torch
from scipy import stats

from risk import MIN_NOISE_MULTIPLIER, poisson_log_likelihood_ratio
from utils import UsageError

# k / M tried, the confidence split among them. Chosen from ideal canary scores of DP-SGD (z = 1, q = 0.023,
# T = 645) and of the Gaussian mechanism at M = 10^3..10^6: the f-DP bound is best at 0.2-1 %, Steinke et
# al.'s at 1-5 %; fewer fractions would leave more confidence to each.
GUESS_FRACTIONS = (0.002, 0.005, 0.01, 0.02, 0.05)
MAX_NOISE_MULTIPLIER = 100.0  # the most private member of the family the f-DP audit tries to reject
# Where the f-DP recursion reads the blow-up inverse f(1 - x): log-spaced to 0.1, then linear.
BLOW_UP_GRID = np.concatenate([[0.0], np.logspace(-12, -1, 2000), np.linspace(0.1, 1.0, 2001)[1:]])


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


def guess_counts(
    scores: np.ndarray, members: np.ndarray, fractions: tuple[float, ...] = GUESS_FRACTIONS
) -> list[tuple[int, int]]:
    """(guesses, correct) for each k / M of `fractions`: "member" for the k highest scores, "non-member" for
    the k lowest. Both audits read these."""
    order = np.argsort(scores)
    counts = []
    for fraction in fractions:
        k = max(1, int(fraction * len(scores)))
        counts.append((2 * k, int(members[order[-k:]].sum() + (~members[order[:k]]).sum())))
    return counts


def guess_audit(
    scores: np.ndarray,
    members: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> dict:
    """Steinke et al.'s ε lower bound from canary scores: the best k's bound at the split confidence, with its
    guesses."""
    level = (1 - confidence) / len(fractions)
    best = {"audit_epsilon": 0.0, "audit_guesses": 0, "audit_correct": 0}
    for guesses, correct in guess_counts(scores, members, fractions):
        eps = audit_epsilon(len(scores), guesses, correct, delta, 1 - level)
        if eps > best["audit_epsilon"]:
            best = {"audit_epsilon": eps, "audit_guesses": guesses, "audit_correct": correct}
    return best


@functools.cache
def dpsgd_blow_up_inverse(noise_multiplier: float, sample_rate: float, steps: int) -> np.ndarray:
    """f(1 - x) on BLOW_UP_GRID, f the trade-off curve of DP-SGD (z, q, T) under add/remove-one from riskcal
    (dp_accounting's pessimistic privacy-loss distribution, symmetric): the least probability of a wrong guess
    that an f-DP mechanism must pay for a right one of probability x. A privacy-loss grid of 1e-3 (riskcal's
    default 1e-4 takes 8x longer) only lowers the curve, by at most 1e-4 at z = 1: the audit errs low."""
    from riskcal.calibration.dpsgd import get_beta_for_dpsgd

    return get_beta_for_dpsgd(noise_multiplier, sample_rate, steps, alpha=1.0 - BLOW_UP_GRID, grid_step=1e-3)


def fdp_rejects(blow_up_inverse: np.ndarray, canaries: int, guesses: int, correct: int, level: float) -> bool:
    """Whether `correct` right guesses of `guesses` on `canaries` canaries reject, at `level`, that the training
    is f-DP (Mahloujifar et al. 2025, the recursive bound). Were the probability of that many right guesses at
    least `level`, each count i < correct down to 0 would force a least mass of right (r) and wrong (h) guesses
    per canary, wrong ones through the blow-up inverse of f; more than the guesses made (guesses / canaries)
    is impossible. The inverse is read at the grid point below x: it increases, so this errs towards keeping
    the hypothesis."""
    right, wrong = level * correct / canaries, level * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        below = blow_up_inverse[np.searchsorted(BLOW_UP_GRID, right, side="right") - 1]
        wrong_next = max(wrong, float(below))
        if wrong_next == wrong:  # neither will change again
            break
        right = min(right + i / (guesses - i) * (wrong_next - wrong), 1.0)
        wrong = wrong_next
    return right + wrong > guesses / canaries


def fdp_audit(
    scores: np.ndarray,
    members: np.ndarray,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str,
    confidence: float = 0.95,
    fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> dict:
    """The f-DP one-run bound from the same guesses as `guess_audit`: the least noise multiplier z* of DP-SGD
    with this q and T whose trade-off curve some k's guesses reject at the split confidence (z* ≥ the run's z
    unless the audit errs, which it does with at most 5 % probability), and the accountant's ε of z*. 0 when
    even z = 100 stands; the ε of z = 0.3, the least noise riskcal's grid affords, when even that is rejected."""
    from privacy import epsilon_spent

    level = (1 - confidence) / len(fractions)
    counts = guess_counts(scores, members, fractions)

    def rejected(z: float) -> bool:
        curve = dpsgd_blow_up_inverse(z, sample_rate, steps)
        return any(fdp_rejects(curve, len(scores), guesses, correct, level) for guesses, correct in counts)

    if not rejected(MAX_NOISE_MULTIPLIER):
        return {"audit_fdp_epsilon": 0.0, "audit_fdp_noise_multiplier": None}
    low, high = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)
    if rejected(MIN_NOISE_MULTIPLIER):
        high = low
    while high - low > 0.005:  # z* to 0.5 %, rounded up: the bound errs low
        middle = (low + high) / 2
        low, high = (low, middle) if rejected(round(math.exp(middle), 6)) else (middle, high)
    z = round(math.exp(high), 6)
    return {
        "audit_fdp_epsilon": epsilon_spent(z, sample_rate, steps, delta, accountant),
        "audit_fdp_noise_multiplier": z,
    }


def ideal_scores(
    members: np.ndarray, noise_multiplier: float, sample_rate: float, steps: int, rng: np.random.Generator
) -> np.ndarray:
    """The canary scores the mechanism itself gives, without training: per step each member is drawn with rate
    q and the coordinate is N(drawn, z²); scored by the same likelihood ratio. The best any canary can do, so
    an audit of these is the most this audit can show for that mechanism and M."""
    scores = np.empty(len(members))
    chunk = max(1, 4_000_000 // steps)  # about 32 MB of draws at a time
    for start in range(0, len(members), chunk):
        part = members[start : start + chunk]
        drawn = part[:, None] & (rng.random((len(part), steps)) < sample_rate)
        seen = rng.normal(drawn.astype(float), noise_multiplier)
        scores[start : start + len(part)] = poisson_log_likelihood_ratio(seen, noise_multiplier, sample_rate).sum(1)
    return scores


class GradientCanaries:
    """M Dirac gradient canaries on distinct random coordinates of `params`; `members` says which were drawn
    into the training set. `add` puts the members drawn into this step's batch into the gradients; `observe`
    scores what the server sees on each canary's coordinate, step by step (memory O(M), not O(M·T))."""

    def __init__(
        self,
        params: list[torch.Tensor],
        count: int,
        clip: float,
        sample_rate: float,
        noise_multiplier: float,
        seed: int,
    ) -> None:
        sizes = [p.numel() for p in params]
        if count > sum(sizes):
            raise UsageError(
                f"--audit-canaries {count}: each canary needs its own trainable coordinate and the model has "
                f"{sum(sizes)}; use at most that many."
            )
        rng = np.random.default_rng(seed)
        flat = rng.choice(sum(sizes), size=count, replace=False)
        starts = np.cumsum([0, *sizes])
        tensor = np.searchsorted(starts, flat, side="right") - 1  # which parameter holds each canary
        # per parameter tensor holding canaries: which canaries, and their offsets in the flattened tensor
        self.groups = [(t, torch.as_tensor(np.flatnonzero(tensor == t)), torch.as_tensor(flat[tensor == t] - starts[t]))
                       for t in np.unique(tensor)]  # fmt: skip
        self.members = rng.random(count) < 0.5
        self.clip, self.sample_rate, self.noise_multiplier, self.rng = clip, sample_rate, noise_multiplier, rng
        self.scores, self.steps = np.zeros(count), 0

    def add(self, grads: list[torch.Tensor], scale: float = 1.0) -> None:
        """Add C·scale on the coordinate of every member this step's Poisson draw includes."""
        drawn = self.members & (self.rng.random(len(self.members)) < self.sample_rate)
        added = torch.from_numpy(drawn) * (self.clip * scale)
        for t, which, offsets in self.groups:
            flat = grads[t].view(-1)
            flat.index_add_(0, offsets.to(flat.device), added.index_select(0, which).to(flat.device, flat.dtype))

    def observe(self, grads: list[torch.Tensor], scale: float = 1.0) -> None:
        """Add this step's evidence of membership to each canary's score: the coordinate the server receives, in
        units of C·scale, through the log-likelihood ratio of the Poisson mixture (1 − q)·N(0, z²) + q·N(1, z²)
        against N(0, z²); without noise, the coordinate itself (the scores are then plain sums)."""
        row = torch.empty(len(self.members), dtype=torch.float64)
        for t, which, offsets in self.groups:
            flat = grads[t].detach().reshape(-1)
            row.index_copy_(0, which, flat.index_select(0, offsets.to(flat.device)).to("cpu", torch.float64))
        row = row.numpy()
        row /= self.clip * scale
        z = self.noise_multiplier
        self.scores += poisson_log_likelihood_ratio(row, z, self.sample_rate) if z else row
        self.steps += 1

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

    def audit(self, delta: float, accountant: str) -> dict:
        """The one-run audit of this training from one set of guesses: Steinke et al.'s and the f-DP ε lower
        bound at 95 % confidence (the family: DP-SGD with this run's q and T), the guesses behind the first, and
        the seconds the two took."""
        start = time.perf_counter()
        steinke = guess_audit(self.scores, self.members, delta)
        fdp = fdp_audit(self.scores, self.members, self.sample_rate, self.steps, delta, accountant)
        return {"audit_canaries": len(self.members), **steinke, **fdp, "audit_seconds": time.perf_counter() - start}
