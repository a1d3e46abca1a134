"""The server side of the threat model: attacks that see the model and a SharedUpdate, never the private batch.

An attack is one entry of ATTACKS. `run` gets the model the server sent, the shared update, the input shape
and number of classes, the study config and an `observe(iteration, images, labels, loss)` callback; the
evaluation side (gradient_attack.py) scores what it observes against the originals, so attacks stay blind.
A malicious server also sets `prepare`, which builds the model it sends to the client from auxiliary data.
The helpers below (sample counts, the image prior, trajectories, the best of restarts) are shared by every
attack module; attacks/matching.py holds what the gradient-matching attacks compare.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from defenses import SharedUpdate

Observer = Callable[[int, torch.Tensor, torch.Tensor, float], None]


@dataclass(frozen=True)
class Reconstruction:
    """An attack's answer: images (N, *input_shape) in [0, 1], labels (N,), its final gradient-matching loss."""

    images: torch.Tensor
    labels: torch.Tensor
    loss: float
    failed: bool = False  # every restart diverged (NaN/inf loss) or the attack could not read the update
    failed_restarts: int = 0
    exact: int | None = None  # analytic attacks: readouts that passed the single-sample check (distinct samples)
    collisions: int | None = None  # ... and readouts that carry several samples (not exact, reported apart)
    features: torch.Tensor | None = None  # readout attacks on a CNN or backbone: the layer inputs they read


@dataclass(frozen=True)
class Served:
    """A malicious server's models: the honest one it would have sent, and the one it sends instead to a
    client training on batches of each size (the server sets the batch size, so it tailors its trap to it);
    the client's detector compares each with the honest one on its held-out data."""

    honest: nn.Module
    sent: dict[int, nn.Module]  # by batch size


@dataclass(frozen=True)
class Attack:
    """One attack: `run(model, update, input_shape, num_classes, cfg, observe) -> Reconstruction`, and for a
    malicious server `prepare(model, input_shape, num_classes, aux, cfg) -> Served` from the honest global model,
    one sent model per batch size in cfg.batch_sizes (aux: a DataSplit disjoint from the victim's images)."""

    run: Callable[..., Reconstruction]
    default_iterations: int
    prepare: Callable[..., Served] | None = None
    description: str = ""
    settings: tuple[str, ...] = ()  # the AttackConfig fields it reads beyond the common ones (seed, iterations, ...)
    check: Callable[[nn.Module], object] | None = None  # raises UsageError where the model does not fit the attack
    learn: Callable[..., Callable[..., Reconstruction]] | None = None  # an honest server's offline step (ggl):
    # learn(aux, cfg) -> run, with a prior learned from aux, a DataSplit disjoint from the victim's images


ATTACKS: dict[str, Attack] = {}


def num_reconstructed(update: SharedUpdate) -> int:
    """How many samples stand behind the update: under secure aggregation, every client's batch."""
    return update.batch_size * update.num_clients


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels: the image prior of Inverting Gradients."""
    if images.dim() != 4:
        return images.new_zeros(())
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return dx + dy


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Detached copy in [0, 1] on the CPU, NaN as mid-grey: what the evaluation may score."""
    return torch.nan_to_num(images.detach().float().cpu(), nan=0.5).clamp(0, 1)


class Trajectory:
    """The logged states of one restart: iteration 0, every `log_every`-th iteration and the last one."""

    def __init__(self, iterations: int, log_every: int):
        self.points = sorted({*range(0, iterations, log_every), iterations})
        self.records: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def log(self, iteration: int, images: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
        if iteration in self.points and (not self.records or self.records[-1][0] < iteration):
            self.records.append((iteration, to_unit(images), labels.detach().cpu().clone(), float(loss)))

    def finish(self) -> None:
        """Repeat the last state, with NaN loss, at the points a stopped (diverged) restart never reached,
        so every batch of a study logs the same iterations."""
        _, images, labels, _ = self.records[-1]
        done = {r[0] for r in self.records}
        self.records += [(i, images, labels, math.nan) for i in self.points if i not in done]


def best_of_restarts(results: list[tuple[Reconstruction, Trajectory]], observe: Observer) -> Reconstruction:
    """Keep the finite-loss restart with the lowest gradient-matching loss; a NaN/inf loss marks a restart
    failed and the others go on. Only the kept restart's trajectory (its missing log points filled) is handed
    to `observe`. If every restart failed, the first is returned as failed."""
    checked = []
    for rec, trajectory in results:
        trajectory.finish()
        checked.append((replace(rec, failed=rec.failed or not math.isfinite(rec.loss)), trajectory))
    finished = [r for r in checked if not r[0].failed]
    best, trajectory = min(finished, key=lambda r: r[0].loss) if finished else checked[0]
    for record in trajectory.records:
        observe(*record)
    return replace(best, images=to_unit(best.images), failed_restarts=len(checked) - len(finished))


from attacks import federated, generative, honest, malicious, optimization  # noqa: E402  (they use the helpers above)

ATTACKS.update(optimization.ATTACKS)
ATTACKS.update(honest.ATTACKS)
ATTACKS.update(malicious.ATTACKS)
ATTACKS.update(federated.ATTACKS)
ATTACKS.update(generative.ATTACKS)
