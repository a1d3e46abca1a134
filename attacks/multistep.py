"""fc-peel on a FedAvg weight update: the first fully connected layer read after many local steps.

That layer's input is the raw data, which local training does not change, so however many steps the client
took, each neuron's row of the shared update is [dW_i | db_i] = sum_n c_ni (x_n, 1), with c_ni sample n's
gradients on neuron i summed over the steps it was processed in (0 where it never fired i). A neuron that one
sample alone fired reads it exactly (x = dW_i / db_i), and subtracting known samples turns shared neurons into
lone ones, as in one gradient (attacks/readout.py). What no longer holds is everything that models c_ni as the
gradient of (x, y) at the sent weights: the single-sample check, the peeling coefficients, the labels.

Here neither needs the model's gradient. The update M (neurons x (d + 1)) has rank n (n <= d + 1 samples), and
sample k's column c_k is, among the columns M g of the rank-one shares that M splits off together with the
known samples (X g = e_k for the known rows X, g in M's row space), the one that vanishes on the neurons k never
fired. Those are found from the protocol alone: a neuron whose pre-activation for x stays below -margin times
how far the local steps could move it (lr * |row of M| * |x|) at both the sent and the returned weights.
Over those neurons the column is a least-squares solve; a candidate is certified when that solve is exact
(float rounding), unique, and the column is nonzero on the neurons x clearly fires, and when it fires no
neuron the update never touched. Peeling then subtracts c_k (x_k, 1) exactly, so the next round's lone
neurons are exact again. A mixture of samples has no such column: the samples it mixes fire neurons it does
not (tests/test_multistep.py; digits, fcnn, 10 epochs of 10 batches of 5: every certificate exact).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from attacks.readout import (
    SIGNAL_FLOOR,
    Readout,
    _distinct,
    firing_silent,
    readout_gradients,
    readout_layer,
    reads_pixels,
)
from defenses import SharedUpdate, trainable_parameters

FLOOR = 3e-8  # the least rounding floor assumed (relative to the update's largest singular value); the floor of an
# update is its float32 weights' rounding, predicted from the protocol (WeightUpdate.floor): a 100-step update of 50
# digits (lr 0.05, fcnn) predicts 2.8e-7, and its 51st singular value is 2.3e-7 (its 50th 7e-5)
RANK_TOLERANCE = 30  # singular values of the update below this many floors are rounding
MARGINS = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
)  # a neuron is surely silent (or firing) for x when its pre-activation stays beyond this
# many times lr * |row| * |x| at the sent and the returned weights (the steps' net move): no contribution of 50
# digits over 100 steps lies beyond 0.25 (fcnn), but with 2 images a batch the partial sums overshoot it past 0.5;
# a margin too narrow leaves the fit inexact (no certificate), one too wide too few neurons to pin the column
EXACT_COLUMN = 30  # floors of relative residual of a column's fit on the silent neurons (a mixture's is O(1))
UNIQUE_COLUMN = 30  # ... and of the fit's smallest singular value relative to the update's largest (a sample that
# another unread one cannot stand in for)
TWIN_TOLERANCE = 300  # floors within which two readouts of one sample agree (relative to the readout's largest pixel)
RANKED = 128  # unchecked readouts (by bias entry) ranked by how narrowly a column pins them; the rest follow
OUTLIERS = 0.03  # at most this share of the surely-silent neurons may be dropped from a robust column's fit
IRLS_STEPS = 15  # reweighted least-squares steps of the robust fit (its inliers settle within ~10)
BOX_TOLERANCE = 1e-3  # how far outside [0, 1] a pixel read may lie: a sample's reads are within 1.2e-4 of it (float
# rounding), a mixture's leave the box by 0.01-0.7 (its samples' weights on a neuron are signed gradients; digits,
# 10 x 10 x 5: 94-95 % of the mixture reads of an update lie outside)
SINGLE_MARGIN = 0.25  # a single read is peeled only where a robust column also pins it at a margin up to this: the
# exact single reads of a stalled peel (digits, 10 x 10 x 5) are pinned at 0.1-0.25 (9 of 11), its mixtures at none
# (81 of 90; 8 at 0.1-0.25)
SUPPORT_FLOOR = 1e-5  # a column entry below this share of its largest on a neuron x clearly fires: not a sample


def rounding_floor(sent: torch.Tensor, returned: torch.Tensor, update: SharedUpdate) -> float:
    """The spectral norm the float32 rounding of the weights leaves in the readout layer's rows of the update
    (sent - returned) / lr, from what the server knows: every local step rounds each weight to float32 (an error
    uniform within half its spacing, a random walk over the steps), so entry ij carries about
    ulp(w_ij) sqrt(steps / 12) / lr, and a matrix of such independent errors has spectral norm about their rms
    times sqrt(rows) + sqrt(columns)."""
    weights = torch.maximum(sent.abs(), returned.abs()).float()
    ulp = (torch.nextafter(weights, torch.full_like(weights, float("inf"))) - weights).double()
    steps = update.local_steps * update.num_clients
    entry = ulp.pow(2).mean().sqrt() * (steps / 12) ** 0.5 / update.lr
    return float(entry * (sent.shape[0] ** 0.5 + sent.shape[1] ** 0.5))


class WeightUpdate:
    """The readout layer's rows of a FedAvg update, its row space and the sent weights, with the peeling state."""

    def __init__(self, model: nn.Module, update: SharedUpdate):
        grad_w, grad_b = readout_gradients(model, update)
        layer = readout_layer(model)
        self.rows = torch.cat([grad_w, grad_b[:, None]], 1).double()
        self.sent = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).double()
        self.returned = self.sent - update.lr * self.rows
        self.drift = update.lr * self.rows.norm(dim=1)  # how far the steps moved each neuron's weights
        norms = self.rows.abs().amax(1)
        self.live = norms > SIGNAL_FLOOR * norms.max().clamp_min(1e-300)
        singular = torch.linalg.svdvals(self.rows)
        self.top = float(singular[0])
        self.floor = max(FLOOR, rounding_floor(self.sent, self.returned, update) / self.top)
        self.rank = int((singular > RANK_TOLERANCE * self.floor * self.top).sum())
        self.basis = torch.linalg.svd(self.rows, full_matrices=False).Vh[: self.rank]  # the row space
        self.known: list[torch.Tensor] = []  # (x, 1) of the certified samples
        self.columns: list[torch.Tensor] = []  # their columns c_k

    def residual(self) -> torch.Tensor:
        if not self.known:
            return self.rows
        return self.rows - torch.stack(self.columns).T @ torch.stack(self.known)

    def column(self, x: torch.Tensor) -> torch.Tensor | None:
        """The column of the candidate x ((x, 1), float64) given the known samples, or None where it is not
        certified as one sample at any of the MARGINS (the narrowest first: most silent neurons)."""
        return next((c for margin in MARGINS if (c := self.column_at(x, margin)) is not None), None)

    def fits(self, x: torch.Tensor, c: torch.Tensor) -> bool:
        """Whether the column has no zero where x fires at both the sent and the returned weights: a mixture's
        column is that of one sample it mixes (the one silent where the mixture is), zero where only the others
        fire; a sample firing a neuron from the first step to the last has a gradient on it."""
        both = self.live & (self.sent @ x > 0) & (self.returned @ x > 0)
        return not bool((both & (c.abs() <= SUPPORT_FLOOR * c.abs().max())).any())

    def column_at(self, x: torch.Tensor, margin: float, robust: bool = False) -> torch.Tensor | None:
        scale = self.drift * x.norm()
        z0, z1 = self.sent @ x, self.returned @ x
        silent = self.live & (z0 < -margin * scale) & (z1 < -margin * scale)
        firing = self.live & (z0 > margin * scale) & (z1 > margin * scale)
        rows = torch.stack([*self.known, x]) @ self.basis.T  # the samples in row-space coordinates
        if int(silent.sum()) < self.rank - len(rows) + 1:
            return None
        dual = torch.linalg.lstsq(rows, torch.eye(len(rows), dtype=rows.dtype)[:, -1:]).solution[:, 0]
        _, s, vh = torch.linalg.svd(rows, full_matrices=True)
        free = vh[len(rows) :].T  # directions that leave every known sample's share alone
        if (x - self.basis.T @ (self.basis @ x)).norm() > TWIN_TOLERANCE * self.floor * x.norm():
            return None  # not in the update's row space: no sample (noise, or a defense's distortion)
        on_silent = self.rows[silent] @ self.basis.T
        if free.shape[1]:
            system = on_silent @ free
            rhs = -(on_silent @ dual)
            if robust:  # drop the few neurons x fired between the sent and the returned weights
                keep = self.inliers(system, rhs, dual, free)
                system, rhs = system[keep], rhs[keep]
                silent = silent.masked_scatter(silent, keep)
            if len(system) < system.shape[1]:
                return None
            if torch.linalg.svdvals(system).min() < UNIQUE_COLUMN * self.floor * self.top:
                return None
            beta = torch.linalg.lstsq(system, rhs[:, None]).solution[:, 0]
            dual = dual + free @ beta
        c = self.rows @ (self.basis.T @ dual)
        if c[silent].norm() > EXACT_COLUMN * self.floor * c.norm():
            return None
        if firing.any() and c[firing].abs().min() < SUPPORT_FLOOR * c.abs().max():
            return None
        return c

    def inliers(self, system: torch.Tensor, rhs: torch.Tensor, dual: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
        """The surely-silent neurons on which the column's least-absolute-deviation fit (iteratively reweighted
        least squares) vanishes to EXACT_COLUMN floors: a pre-activation below the margin at the sent and the
        returned weights can still have crossed 0 in between, and one such neuron makes the least-squares fit of a
        true sample inexact (digits, 10 x 10 x 5: 0-9 of ~200 neurons at margin 0.05). Where more than OUTLIERS of
        them would go, none is dropped: a mixture needs many."""
        weights = torch.ones(len(system), dtype=system.dtype)
        for _ in range(IRLS_STEPS):
            beta = torch.linalg.lstsq(system * weights[:, None], (rhs * weights)[:, None]).solution[:, 0]
            residual = system @ beta - rhs
            size = (self.rows @ (self.basis.T @ (dual + free @ beta))).norm()
            weights = 1 / residual.abs().clamp_min(3 * self.floor * size).sqrt()
        keep = residual.abs() <= EXACT_COLUMN * self.floor * size
        return keep if (~keep).sum() <= OUTLIERS * len(keep) else torch.ones_like(keep)


def returned_labels(
    model: nn.Module, update: SharedUpdate, inputs: torch.Tensor, input_shape: tuple[int, ...]
) -> torch.Tensor:
    """The labels of read inputs (pixels) as the model the client returned predicts them: it trained on them for
    the update's local epochs, so it fits them (the sent model, at initialisation, would guess)."""
    returned = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(trainable_parameters(returned), update.gradients, strict=True):
            p -= update.lr * g.to(p.device) / update.num_clients
        if not len(inputs) or not reads_pixels(model, input_shape):
            return torch.zeros(len(inputs), dtype=torch.long)
        return returned(inputs.view(-1, *input_shape).to(next(model.parameters()).device)).argmax(1).cpu()


def readouts(state: WeightUpdate) -> torch.Tensor:
    """(x, 1) of every live neuron of what peeling left, the largest bias entries (best conditioned) first."""
    residual = state.residual()
    carry = residual[:, -1].abs()
    rows = (state.live & (carry > SIGNAL_FLOOR * carry.max().clamp_min(1e-300))).nonzero().squeeze(1)
    rows = rows[carry[rows].argsort(descending=True)]
    return residual[rows] / residual[rows, -1:]


def twice_read(x: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The readouts (x, 1) that at least one other neuron reads too, to `tolerance`: a neuron that several
    samples fired reads a mixture weighted by their gradients on it, and two neurons weigh them alike only by
    chance, while a sample's lone neurons all read it exactly."""
    if len(x) < 2:
        return x[:0]
    near = torch.cdist(x[:, :-1], x[:, :-1], p=float("inf")) <= tolerance * x[:, :-1].abs().amax(1, keepdim=True)
    return x[near.sum(1) >= 2]


def pinned(state: WeightUpdate, x: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The index of the narrowest margin at which x has a robust column that fits its firing, and that column
    (len(MARGINS), None: none). True reads are pinned at the narrow margins, most mixtures at none or the wide
    ones (digits, 10 x 10 x 5, ground truth)."""
    for k, margin in enumerate(MARGINS):
        c = state.column_at(x, margin, robust=True)
        if c is not None and state.fits(x, c):
            return k, c
    return len(MARGINS), None


def pinned_single(state: WeightUpdate, x: torch.Tensor) -> bool:
    """Whether a robust column pins a single read x at SINGLE_MARGIN or narrower: a read whose exact column is
    that of one sample it mixes (the column does not tell them apart) is mostly pinned at none."""
    return pinned(state, x)[0] <= MARGINS.index(SINGLE_MARGIN)


def best_uncertified(state: WeightUpdate, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, bool]]:
    """The twin read pinned at the narrowest margin by a robust column, uncertified: once certification stalls
    this peels on (singles are not tried: there the robust fit also pins mixtures of many samples)."""
    if not len(x):
        return []
    ranks = [pinned(state, xi) for xi in x]
    best = min(range(len(x)), key=lambda i: ranks[i][0])
    return [(x[best], ranks[best][1], False)] if ranks[best][1] is not None else []


def in_box(x: torch.Tensor, pixels: bool) -> torch.Tensor:
    """Which readouts (x, 1) lie in the data range [0, 1] that every input of the pipeline has (data_sources.py):
    a sample's reads do, a mixture's mostly do not (its weights are signed). Features (a readout layer behind
    convolutions or a backbone) have no such range: all pass."""
    if not pixels:
        return torch.ones(len(x), dtype=torch.bool)
    return ((x[:, :-1] >= -BOX_TOLERANCE) & (x[:, :-1] <= 1 + BOX_TOLERANCE)).all(1)


def read_weight_update(
    model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], num_classes: int, seed: int
) -> Readout:
    """Peeling of the readout layer's rows of a multi-step update, among the reads that lie in the data range (a
    mixture's mostly do not): the samples read on two neurons alike and certified by their column, peeled round
    after round, or where none is, the single read (largest bias entry first) whose column certifies and fits and
    that a robust column pins narrowly, uncertified; once that stalls, twin reads with a robust column (inliers of
    the surely-silent neurons), peeled uncertified one a round; then the readouts of what is left, unchecked: those
    read on two neurons alike first, then the others, each group ranked by the narrowest margin at which a robust
    column pins them (a true single read is pinned at 0.05-0.25, a mixture of many at >= 0.25 or not at all), then
    in the data range first, then by bias entry. Certified rows come first, then the uncertified peels, then the
    rest."""
    state = WeightUpdate(model, update)
    pixels = reads_pixels(model, input_shape)
    silent = ~state.live
    tolerance = TWIN_TOLERANCE * state.floor
    certified: list[bool] = []
    robust = False
    while len(state.known) < state.rank:
        x = readouts(state)
        twins = twice_read(x, tolerance)
        x = x[_distinct(x[:, :-1].float(), torch.stack(state.known)[:, :-1].float() if state.known else None)]
        x = x[~firing_silent(model, x[:, :-1], silent) & in_box(x, pixels)]
        twin = (torch.cdist(x[:, :-1], twins[:, :-1], p=float("inf")) <= tolerance).any(1)
        if robust:  # certification stalled: the twin read that a robust column pins most narrowly, uncertified
            new = best_uncertified(state, x[twin])
        else:
            new = [(xi, c, True) for xi in x[twin] if (c := state.column(xi)) is not None]
        if not new and not robust:  # none read twice: the best-conditioned single read that fits and is pinned
            singles = x[~twin]
            new = next(
                (
                    [(xi, c, False)]
                    for xi in singles
                    if (c := state.column(xi)) is not None and state.fits(xi, c) and pinned_single(state, xi)
                ),
                [],
            )
            if not new:
                robust = True
                continue
        if not new:
            break
        for xi, c, sure in new[: state.rank - len(state.known)]:
            state.known.append(xi)
            state.columns.append(c)
            certified.append(sure)
    rest = readouts(state)  # unchecked: those read on two neurons alike first, then by their bias entry
    twins = twice_read(rest, tolerance)
    rest = torch.cat([twins, rest])
    rest = rest[_distinct(rest[:, :-1].float(), torch.stack(state.known)[:, :-1].float() if state.known else None)]
    rest = rest[~firing_silent(model, rest[:, :-1], silent)]
    inside = in_box(rest, pixels)
    rest = torch.cat([rest[inside], rest[~inside]])
    rank = torch.tensor([pinned(state, xi)[0] for xi in rest[:RANKED]] + [len(MARGINS)] * len(rest[RANKED:]))
    rest = rest[torch.sort(rank, stable=True).indices][:, :-1]
    sure = torch.tensor(certified, dtype=torch.bool)
    known = torch.stack(state.known)[:, :-1] if state.known else rest.new_zeros(0, rest.shape[1])
    known = torch.cat([known[sure], known[~sure]]) if len(known) else known
    inputs = torch.cat([known, rest]).float()
    return Readout(
        inputs=inputs,
        labels=returned_labels(model, update, inputs, input_shape),
        exact=int(sure.sum()),
        collisions=len(inputs) - int(sure.sum()),
        unexplained=float(state.residual().norm() / state.rows.norm().clamp_min(1e-300)),
        labelled=pixels,
    )
