"""Analytic attacks of an honest server: the model is the one the client trains, untouched.

`fc-readout` reads the input of the model's first fully connected layer with a bias off its gradient
(attacks/readout.py): for one sample the weight gradient is the rank-one b x^T, so x comes back exactly; for a
batch, the samples that some neuron holds alone are read and peeled off. For an MLP x is the image; for a CNN,
LeNet or a frozen-backbone head it is the layer's input features, which attacks/inversion.py turns into images.
The readout models the defense it knows: it fits x on the shared entries only (pruning, top-k), averages the
error over all neurons (noise, quantization, DP-SGD), and adds the regularized loss's penalty gradient.

`fc-peel` reads whole batches off the same honest layer: the samples some neuron holds alone are read, checked
and subtracted, round after round until nothing more resolves (an LT code's peeling decoder: each sample read
turns neurons it shared into lone ones), and the samples no neuron isolates are then sought by the sparse
factorisation of what is left (attacks/sparse.py, SPEAR). Every sample it reports passed the single-sample
check. `cpa`, the cocktail-party attack (Kariyappa et al. ICML 2023), unmixes the same gradient by independent
component analysis: each neuron's gradient row [dL/dW_i | dL/db_i] mixes the samples' (x_s, 1), so FastICA's
components are the samples up to sign and scale, which the bias coordinate (1 for every sample) fixes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from sklearn.exceptions import ConvergenceWarning

from attacks import Attack, Observer, Reconstruction, num_reconstructed
from attacks.federated import as_gradient
from attacks.inversion import INVERSION_SETTINGS, readout_reconstruction
from attacks.labels import recover_labels
from attacks.readout import (
    SIGNAL_FLOOR,
    Readout,
    on_cpu,
    rank_one_readout,
    read_update,
    readout_gradients,
    readout_layer,
)
from attacks.sparse import ZERO_TOLERANCE, checked_columns
from defenses import SharedUpdate

if TYPE_CHECKING:
    from config import AttackConfig

EXACT_RESIDUAL = 1e-4  # a rank-one fit whose residual is below this share of the gradient is an exact readout


def lone_sample_readout(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...]) -> Readout:
    """The readout of a lone sample (batch 1, no aggregation): rank_one_readout of the readout layer, with
    the regularized loss's penalty modelled, and the label read off the last layer (iDLG). Its
    `unexplained` share is the residual of the rank-one fit on the shared entries: rounding alone without a
    defense, the defense's distortion with one."""
    grad_w, grad_b = readout_gradients(model, update)
    weight = readout_layer(model).weight.detach()
    x = rank_one_readout(grad_w, grad_b, weight, update.kappa)
    fit = grad_b[:, None] * x[None] + 2 * update.kappa * weight * x.pow(2)
    shared = grad_w != 0
    unexplained = float((grad_w - fit)[shared].norm() / grad_w.norm().clamp_min(1e-30))
    exact = int(unexplained < EXACT_RESIDUAL)
    label = recover_labels(model, update, input_shape, 1)
    return Readout(x[None], label, exact=exact, collisions=0, unexplained=unexplained)


def fc_readout(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], num_classes: int, seed: int):
    """The readout of the first fully connected layer: exact for one sample, partial for a batch (the
    samples some neuron holds alone, a few peeling rounds)."""
    if num_reconstructed(update) == 1:
        return lone_sample_readout(model, update, input_shape)
    return read_update(model, update, input_shape, num_classes)


def fc_peel(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], num_classes: int, seed: int):
    """Peeling to the end (from both sides where the classifier follows), then the sparse factorisation of
    the rest: every reported sample is certified; what stays unresolved is filled with unchecked readouts. A
    FedAvg weight update (several local steps) is read by attacks/multistep.py."""
    if update.local_steps > 1:
        from attacks.multistep import read_weight_update

        return read_weight_update(model, update, input_shape, num_classes, seed)
    batch = num_reconstructed(update)
    return read_update(model, update, input_shape, num_classes, rounds=batch, factorise=True)


def mixing_columns(rows: torch.Tensor, components: int, seed: int) -> torch.Tensor:
    """FastICA on the gradient `rows` (one per neuron, each a mixture of the samples' (x, 1)): the input
    coordinates are ICA's observations and the neurons its mixed signals, so the `components` independent
    sources are the samples and the mixing matrix's columns (returned as rows, (components, neurons)) are
    each sample's gradient on every neuron, up to sign and scale."""
    from sklearn.decomposition import FastICA

    ica = FastICA(n_components=components, whiten="unit-variance", max_iter=200, tol=1e-4, random_state=seed)
    with warnings.catch_warnings():  # a batch that does not separate well still gives its best components
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        ica.fit(rows.T.numpy())
    return torch.from_numpy(ica.mixing_.T.copy())


def cpa_readout(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], num_classes: int, seed: int):
    """The cocktail-party attack on the readout layer: FastICA on the rows [dL/dW_i | dL/db_i] of the neurons
    that carry gradient, as many components as the gradient has rank (at most the batch size). Each
    component's mixing column is its sample's gradient on every neuron, so the components go through the
    same column check as the sparse factorisation; those that pass are exact, the rest are reported as
    unchecked readouts (a component that mixes samples or misses a sample's sign pattern)."""
    grad_w, grad_b = readout_gradients(model, update)
    batch = num_reconstructed(update)
    residual = torch.cat([grad_w, grad_b[:, None]], 1).double() * batch / update.num_clients
    norms = residual.abs().amax(1)
    live = norms > ZERO_TOLERANCE * norms.max().clamp_min(1e-300)
    singular = torch.linalg.svdvals(residual[live])
    rank = min(batch, int((singular > 1e-7 * singular[0]).sum()))
    columns = mixing_columns(residual[live], rank, seed)
    silent = norms <= SIGNAL_FLOOR * norms.max()
    x, labels, error = checked_columns(model, columns, live, residual, silent, num_classes, input_shape)
    exact = int((error < 1).sum())
    unexplained = float(torch.linalg.svdvals(residual[live])[rank:].norm() / singular.norm().clamp_min(1e-30))
    return Readout(x.float(), labels, exact=exact, collisions=len(x) - exact, unexplained=unexplained)


def readout_attack(read: Callable[..., Readout]) -> Callable[..., Reconstruction]:
    """An attack from a readout `read(model, update, input_shape, num_classes, seed)`: the readout on CPU
    copies, then the images (pixels as read, or features inverted)."""

    def run(
        model: nn.Module,
        update: SharedUpdate,
        input_shape: tuple[int, ...],
        num_classes: int,
        cfg: AttackConfig,
        observe: Observer,
    ) -> Reconstruction:
        model, update = on_cpu(model, update)
        readout = read(model, update, input_shape, num_classes, cfg.seed)
        return readout_reconstruction(model, readout, as_gradient(update), input_shape, cfg, observe)

    return run


ATTACKS = {
    "fc-readout": Attack(
        readout_attack(fc_readout),
        1,
        description="exact readout of the first FC layer's input, then inversion",
        settings=INVERSION_SETTINGS,
        check=readout_layer,
    ),
    "fc-peel": Attack(
        readout_attack(fc_peel),
        1,
        description="whole batches from an honest FC layer: peeling, then sparse factorisation; each sample checked",
        settings=INVERSION_SETTINGS,
        check=readout_layer,
    ),
    "cpa": Attack(
        readout_attack(cpa_readout),
        1,
        description="cocktail-party attack: FastICA unmixes the FC layer's gradient into the batch",
        settings=INVERSION_SETTINGS,
        check=readout_layer,
    ),
}
