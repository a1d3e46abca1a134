"""The sparse factorisation of a ReLU layer's gradient (SPEAR, Dimitrov et al. NeurIPS 2024), for the samples
that no neuron holds alone, so peeling (attacks/readout.py) cannot read them.

What peeling leaves of the layer's gradient, [dL/dW | dL/db] = sum_s c_s (x_s, 1)^T over the r samples still
unread, has rank r, and each column c_s (the sample's gradient on every neuron) is zero on the neurons the
sample does not fire: about half of them at initialisation. Every c_s is a vector U q of the r-dimensional
column space U; choosing r - 1 neurons where one sample is silent leaves q as the null vector of those rows
of U, and the vector it gives is sparse (zero on all of that sample's silent neurons), while a choice that
mixes samples gives a vector zero only on the r - 1 chosen neurons. Random choices that happen to be of the
first kind are kept; with r independent sparse columns C, the samples come back as C^+ [dL/dW | dL/db]
(each row a scaled (x_s, 1)), and each is checked like a peeled readout: the gradient a lone (x_s, y) would
put on every neuron must match its column. The search succeeds with probability about r 2^-(r-1) per
choice, so it serves a handful of samples left after peeling, not a whole batch (SPEAR: exact to B ~ 25).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attacks.readout import firing_silent, preactivation_grads  # readout imports this module only when it runs

SPARSE_MAX_RANK = 16  # at most this many unread samples (r 2^-(r-1): ~5e-4 of the choices succeed at 16)
SPARSE_TRIALS = 100_000  # random choices of r - 1 neurons, searched in chunks (a few seconds on a CPU)
SPARSE_CHUNK = 5_000
ZERO_TOLERANCE = 1e-6  # a column's entry below this share of its largest is a zero (float64 residuals: ~1e-10)
COLUMN_TOLERANCE = 1e-3  # relative L2 mismatch between a sample's column and a lone sample's gradient on every
# neuron: a mixture of samples misses by O(1); a whole vector matching by chance is out of the question


def factorised_samples(
    model: nn.Module,
    dw: torch.Tensor,
    db: torch.Tensor,
    remaining: int,
    silent: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked samples of the residual gradient (dw, db: sums over the batch, float64): their inputs, the
    label that explains each, and its column mismatch in units of COLUMN_TOLERANCE (below 1). Empty where the
    residual has no rank, more than SPARSE_MAX_RANK, or the search found too few sparse columns."""
    empty = dw.new_zeros(0, dw.shape[1]), torch.zeros(0, dtype=torch.long), dw.new_zeros(0)
    residual = torch.cat([dw, db[:, None]], 1)
    norms = residual.abs().amax(1)
    live = norms > ZERO_TOLERANCE * norms.max().clamp_min(1e-300)
    u, s, _ = torch.linalg.svd(residual[live], full_matrices=False)
    rank = min(int((s > 1e-7 * s[0]).sum()) if len(s) else 0, remaining)
    if not 0 < rank <= SPARSE_MAX_RANK or int(live.sum()) <= rank:
        return empty
    basis = u[:, :rank]
    columns = sparse_columns(basis, rank, seed)
    if len(columns) < rank:
        return empty
    x, labels, error = checked_columns(model, columns, live, residual, silent, num_classes, input_shape)
    ok = error < 1
    return x[ok], labels[ok], error[ok]


def checked_columns(
    model: nn.Module,
    columns: torch.Tensor,
    live: torch.Tensor,
    residual: torch.Tensor,
    silent: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples behind k columns (k, live neurons) of the layer's gradient `residual` [dL/dW | dL/db]
    (sums): C^+ residual gives each a scaled (x, 1), and the column, so scaled, must match the gradient a
    lone (x, y) gives every neuron for some label y. Returns every sample's input, best label and mismatch in
    units of COLUMN_TOLERANCE, checked ones (below 1) first, and how many passed."""
    full = torch.zeros(len(columns), len(residual), dtype=residual.dtype)
    full[:, live] = columns.to(residual.dtype)
    rows = torch.linalg.lstsq(full.T, residual).solution  # (k, d + 1): each lambda_s (x_s, 1)
    scale = rows[:, -1:]
    x = rows[:, :-1] / scale
    observed = full * scale  # each sample's own gradient on every neuron
    k = len(x)
    labels = torch.arange(num_classes).repeat(k)
    g = preactivation_grads(model, x.float().repeat_interleave(num_classes, 0), labels, input_shape).double()
    g = g.view(k, num_classes, -1)
    mismatch = (g - observed[:, None]).norm(dim=-1) / torch.maximum(g.norm(dim=-1), observed.norm(dim=-1)[:, None])
    best = (mismatch / COLUMN_TOLERANCE).min(1)
    error = torch.where(firing_silent(model, x, silent), torch.inf, best.values)
    order = error.argsort()
    return x[order], best.indices[order], error[order]


def sparse_columns(basis: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """Up to `rank` independent sparse vectors of the column space `basis` (L, rank), sparsest first: the
    null vectors of random sets of rank - 1 rows, kept where they vanish on clearly more rows than were
    chosen. A vector that mixes two samples (both silent on the chosen rows) is zero only where both are,
    so it is less sparse than either sample's own column and is passed over once those are taken."""
    rows = len(basis)
    if rank == 1:  # one sample left: the column space is its column
        return (basis / basis.abs().amax(0)).T
    gen = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(SPARSE_TRIALS // SPARSE_CHUNK):
        pick = torch.rand(SPARSE_CHUNK, rows, generator=gen).argsort(1)[:, : rank - 1]
        q = torch.linalg.svd(basis[pick], full_matrices=True).Vh[:, -1]  # (chunk, rank) null vectors
        vectors = q @ basis.T
        zeros = vectors.abs() <= ZERO_TOLERANCE * vectors.abs().amax(1, keepdim=True)
        sparse = zeros.sum(1) >= 2 * (rank - 1) + 3
        found.append(vectors[sparse] / vectors[sparse].abs().amax(1, keepdim=True))
        if sum(map(len, found)) >= 8 * rank:
            break
    candidates = torch.cat(found)
    order = (candidates.abs() <= ZERO_TOLERANCE).sum(1).argsort(descending=True)
    chosen: list[torch.Tensor] = []
    for vector in candidates[order]:
        trial = torch.stack([*chosen, vector])
        if torch.linalg.matrix_rank(trial, rtol=1e-6) == len(trial):
            chosen.append(vector)
            if len(chosen) == rank:
                break
    return torch.stack(chosen) if chosen else basis.new_zeros(0, rows)
