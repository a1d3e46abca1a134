"""Peeling from the other side: readouts from neurons that every sample but one fires.

A trained layer has few neurons that a single sample fires, but many that nearly all samples fire. Where the
readout layer feeds, through a ReLU, straight into the classifier z' = V h + c (the fcnn and the cnn), sample s
puts g_si = <V_i, e_s> on neuron i if it fires it (e_s = p_s - y_s, its softmax error), and the server knows
the classifier's bias gradient E = sum_s e_s. A neuron that every sample fires therefore has
dL/db_i = <V_i, E> exactly, which picks those neurons out, and their weight gradients dL/dW_i = sum_c V_ci T_c
give T = sum_s e_s x_s^T by least squares. Then for every neuron the complement

    R_i = sum_c V_ci T_c - dL/dW_i = sum over the samples that do NOT fire i of <V_i, e_s> x_s
    r_i = <V_i, E> - dL/db_i       = sum over the same samples of <V_i, e_s>

is the gradient of the samples it leaves silent, so a neuron that all samples but one fire reads that one,
x = R_i / r_i, checked like any readout: a lone (x, y) must give <V_i, e(x, y)> = r_i, leave neuron i silent and
fire every neuron that all samples fire, and taken in turn with the other readouts (attacks.readout): once the
samples taken before it are peeled, what they put on neuron i's complement is gone, and a second readout of one
of them is refused. Samples read (from either side) are removed from T and E too, and peeling goes on from both
sides (a trained fcnn: 0.98 of the faces at B = 64, 0.59 of the digits at B = 32; bench/honest_bench.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.readout import (
    CHECK_TOLERANCE,
    FIRING_MARGIN,
    ROUNDING_MARGIN,
    firing_silent,
    forward_from_layer,
    readout_layer,
    within_slack,
)

ALWAYS_ON_TOLERANCE = 1e-5  # |dL/db_i - <V_i, E>| below this share of |V_i| . |E|: every sample fires neuron i


def classifier_after(model: nn.Module) -> nn.Linear | None:
    """The classifier that reads the readout layer's (ReLU) output directly, or None (LeNet's readout layer is
    its classifier; an imprint block feeds a whole network)."""
    layer = readout_layer(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    fits = head is not layer and head.bias is not None and head.in_features == layer.out_features
    return head if fits else None


class Complement:
    """The complement of the readout layer's gradient over the samples not yet read (T and E shrink as
    samples are read), and its checked readouts."""

    def __init__(self, model: nn.Module, head: nn.Linear, dw: torch.Tensor, db: torch.Tensor, errors: torch.Tensor):
        """dw, db: the readout layer's gradient sums over the batch; errors: E, the classifier's bias
        gradient summed over the batch."""
        self.model = model
        self.v = head.weight.detach().double()  # (C, m)
        self.e = errors.double()
        expected = self.e @ self.v
        scale = self.e.abs() @ self.v.abs()
        self.always_on = (db - expected).abs() <= ALWAYS_ON_TOLERANCE * scale
        self.ready = int(self.always_on.sum()) > len(self.e)
        if self.ready:
            on = self.always_on
            self.t = torch.linalg.lstsq(self.v[:, on].T, dw[on]).solution  # (C, d)

    def readouts(
        self,
        dw: torch.Tensor,
        db: torch.Tensor,
        floor: torch.Tensor,
        silent: torch.Tensor,
        num_classes: int,
        input_shape: tuple[int, ...],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Candidates x = R_i / r_i of the neurons whose complement carries gradient, the best label of each,
        its mismatch in units of the tolerance (below 1: one sample), as attacks.readout checks a readout, and
        the neuron i each was read on."""
        rw, rb = self.v.T @ self.t - dw, self.e @ self.v - db
        rows = (rb.abs() > floor).nonzero().squeeze(1)
        rows = rows[rb[rows].abs().argsort(descending=True)]
        if not len(rows):
            return dw.new_zeros(0, dw.shape[1]), torch.zeros(0, dtype=torch.long), dw.new_zeros(0), rows
        x, observed = rw[rows] / rb[rows, None], rb[rows, None]
        with torch.no_grad():
            logits, z = forward_from_layer(self.model, x.float(), input_shape)
        errors = logits.double().softmax(1)[:, None, :] - torch.eye(num_classes, dtype=torch.float64)  # (n, y, C)
        predicted = (errors * self.v[:, rows].T[:, None, :]).sum(-1)  # <V_i, e(x, y)> for each label y
        error = (predicted - observed).abs() / torch.maximum(predicted.abs(), observed.abs())
        z, w = z.double(), readout_layer(self.model).weight.detach().double()
        margin = FIRING_MARGIN * (x.abs() @ w.abs().T + readout_layer(self.model).bias.detach().double().abs())
        fires_own = z.gather(1, rows[:, None]).squeeze(1) > margin.gather(1, rows[:, None]).squeeze(1)
        misses_always_on = ((z < -margin) & self.always_on).any(1)
        error[fires_own | misses_always_on | firing_silent(self.model, x, silent)] = math.inf
        error = within_slack(error, self.slack(rows, db, observed.squeeze(1))[:, None])
        best = error.min(1)
        return x, best.indices, best.values, rows

    def slack(self, rows: torch.Tensor, db: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """The check's tolerance on the complements r_i of neurons `rows` (relative to `observed`, their values):
        CHECK_TOLERANCE plus ROUNDING_MARGIN times the float32 rounding of <V_i, E> and dL/db_i."""
        rounding = torch.finfo(torch.float32).eps * (self.e.abs() @ self.v.abs() + db.abs())[rows]
        return CHECK_TOLERANCE + ROUNDING_MARGIN * rounding / observed.abs()

    def in_turn(
        self, rows: torch.Tensor, db: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For attacks.readout's check in turn: the complements r_i of neurons `rows` (the readouts' own
        observations), their tolerance, and share[i, t], what candidate t (x, labels) would put on r_i:
        <V_i, e_t> if it leaves neuron i silent, else nothing."""
        with torch.no_grad():
            logits, z = forward_from_layer(self.model, x.float(), input_shape)
        errors = logits.double().softmax(1) - F.one_hot(labels, len(self.e)).double()
        share = ((errors @ self.v) * (z <= 0))[:, rows].T
        observed = (self.e @ self.v - db)[rows]
        return observed, self.slack(rows, db, observed), share

    def remove(self, x: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...]) -> None:
        """Take samples read (from either side) out of T and E."""
        with torch.no_grad():
            logits, _ = forward_from_layer(self.model, x.float(), input_shape)
        errors = logits.double().softmax(1) - F.one_hot(labels, len(self.e)).double()
        self.t = self.t - errors.T @ x
        self.e = self.e - errors.sum(0)
