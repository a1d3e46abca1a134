"""Analytic attacks of an honest server: the model is the one the client trains, untouched.

`fc-readout` reads the input of the model's first fully connected layer with a bias off its gradient
(attacks/readout.py): for one sample the weight gradient is the rank-one b x^T, so x comes back exactly; for a
batch, the samples that some neuron holds alone are read and peeled off. For an MLP x is the image; for a CNN,
LeNet or a frozen-backbone head it is the layer's input features, which attacks/inversion.py turns into images.
The readout models the defense it knows: it fits x on the shared entries only (pruning, top-k), averages the
error over all neurons (noise, quantization, DP-SGD), and adds the regularized loss's penalty gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

from attacks import Attack, Observer, Reconstruction, num_reconstructed
from attacks.inversion import INVERSION_SETTINGS, readout_reconstruction
from attacks.labels import recover_labels
from attacks.readout import Readout, on_cpu, rank_one_readout, read_update, readout_gradients, readout_layer
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


def run_fc_readout(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """The readout of the first fully connected layer, then the images (pixels as read, or features
    inverted); exact for one sample, partial for a batch (the samples some neuron holds alone)."""
    model, update = on_cpu(model, update)
    if num_reconstructed(update) == 1:
        readout = lone_sample_readout(model, update, input_shape)
    else:
        readout = read_update(model, update, input_shape, num_classes)
    return readout_reconstruction(model, readout, update, input_shape, cfg, observe)


ATTACKS = {
    "fc-readout": Attack(
        run_fc_readout,
        1,
        description="exact readout of the first FC layer's input, then inversion",
        settings=INVERSION_SETTINGS,
        check=readout_layer,
    ),
}
