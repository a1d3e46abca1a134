"""Images from the features that a readout recovered: the input of the readout layer is known exactly (conv
features of a CNN, a frozen backbone's features), and the images are found by matching those features, together
with the shared gradients of the layers in front of the readout layer where there are any (conv layers the client
trains; a frozen backbone has none), under a total-variation image prior.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from attacks import Observer, Reconstruction, Trajectory, num_reconstructed, total_variation
from attacks.labels import recover_labels
from attacks.layerwise import invert_conv_input, recover_conv_input
from attacks.readout import (
    Readout,
    frozen_copy,
    preactivation_grads,
    readout_images,
    readout_inputs,
    readout_layer,
    readout_rows,
    reads_pixels,
)
from defenses import SharedUpdate, trainable_parameters

if TYPE_CHECKING:
    from config import AttackConfig

INVERSION_LR = 0.2  # first Adam step on pixels in [0, 1] when inverting features (GIAvMP on a CNN), decayed
# to 0 on a cosine: +6 dB on digits and faces (B = 16, 3 draws) over a constant 0.05, which converged too slowly
INVERSION_TV = 1e-2  # weight of the total-variation prior in that inversion
INVERSION_SETTINGS = (
    "inversion_steps",
    "inversion_gradient_weight",
    "inversion_restarts",
)  # the AttackConfig fields it reads


def layers_in_front(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters in front of the readout layer (a CNN's convolutions; none for an MLP or a
    frozen backbone's head), in parameter order: the ones whose shared gradients the inversion can match."""
    shared = trainable_parameters(model)
    return shared[: [id(p) for p in shared].index(id(readout_layer(model).weight))]


def conv_gradient_error(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...], update: SharedUpdate
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient-matching term of the CNN inversion, as a function of a batch of images: the relative L2
    error, summed over the parameters in front of the readout layer, between their shared gradient and the
    one these images would give. Features and labels are exact, so each sample's dL/dfeature is known and
    that gradient is one vector-Jacobian product of the images' features; it is 0 at the private batch."""
    frozen, frozen_layer = frozen_copy(model)
    layer = readout_layer(model)
    before = layers_in_front(model)
    names = {id(p): n for n, p in model.named_parameters()}
    params = [dict(frozen.named_parameters())[names[id(p)]].requires_grad_(True) for p in before]
    targets = [g.cpu() / update.num_clients for g in update.gradients[: len(before)]]  # a mean over all samples
    deltas = preactivation_grads(model, features, labels, input_shape) @ layer.weight.detach() / len(features)

    def error(images: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(
            (readout_inputs(frozen, images, frozen_layer) * deltas).sum(), params, create_graph=True
        )
        return sum(
            ((g - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30) for g, t in zip(grads, targets, strict=True)),
            torch.zeros(()),
        )

    return error


def invert_features(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    input_shape: tuple[int, ...],
    update: SharedUpdate,
    cfg: AttackConfig,
    observe: Observer,
) -> tuple[torch.Tensor, float]:
    """Images whose features at the readout layer match the ones read exactly off its gradient and whose
    gradients in front of it match the shared ones (gradient + feature matching): GIAvMP's CNN variant, the
    honest fc-readout on a CNN, and a frozen backbone's head (run in eval mode with gradients on; it has no
    trainable layer in front, so only its features are matched).

    Adam on the pixels, kept in [0, 1], on the relative feature error plus a TV prior, with the pull of
    conv_gradient_error added, rescaled per image to --inversion-gradient-weight times the feature term's: at
    a fixed weight it is far steeper and rougher and swamps the feature term (which measured worse).
    Rescaled, it measured level with feature matching alone (within 0.5 dB) at 2-3x the cost: the exact
    features already pin down most of what the convolutions saw. Returns the images and the final
    feature error."""
    frozen, frozen_layer = frozen_copy(model)
    weight = cfg.inversion_gradient_weight if layers_in_front(model) else 0.0  # 0: features alone
    gradient_error = conv_gradient_error(model, features, labels, input_shape, update) if weight else None
    gen = torch.Generator().manual_seed(cfg.seed)
    dummy = (0.5 + 0.05 * torch.randn(len(features), *input_shape, generator=gen)).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=INVERSION_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.inversion_steps)
    scale = features.pow(2).sum(1).mean().clamp_min(1e-12)
    per_image = (-1, *[1] * len(input_shape))
    trajectory = Trajectory(cfg.inversion_steps, cfg.log_every)
    for step in range(cfg.inversion_steps + 1):
        feature_error = (readout_inputs(frozen, dummy, frozen_layer) - features).pow(2).sum(1).mean() / scale
        trajectory.log(step, dummy, labels, feature_error.item())
        if step == cfg.inversion_steps:
            break
        pull = torch.autograd.grad(feature_error + INVERSION_TV * total_variation(dummy), dummy)[0]
        if gradient_error is not None:
            extra = torch.autograd.grad(gradient_error(dummy), dummy)[0]
            ratio = pull.flatten(1).norm(dim=1) / extra.flatten(1).norm(dim=1).clamp_min(1e-30)
            pull = pull + weight * extra * ratio.view(per_image)
        dummy.grad = pull
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            dummy.clamp_(0, 1)
    trajectory.finish()
    for record in trajectory.records:
        observe(*record)
    return dummy.detach().clamp(0, 1), feature_error.item()


def readout_reconstruction(
    model: nn.Module,
    readout: Readout,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """Images from a readout: as they are where the readout layer reads pixels (its loss the share of the
    layer's gradient left unexplained), else by inverting the features (its loss the final feature error;
    the features go with the reconstruction, for the evaluation to say how exactly they were read)."""
    count = num_reconstructed(update)
    readout = with_counted_labels(readout, model, update, input_shape, count, cfg.seed)
    counts = {"exact": readout.exact, "collisions": readout.collisions}
    if reads_pixels(model, input_shape):
        images, labels = readout_images(readout, count, input_shape)
        observe(1, images, labels, readout.unexplained)
        return Reconstruction(images, labels, readout.unexplained, **counts)
    features, labels = readout_rows(readout, count)
    target = recover_conv_input(model, update, features, input_shape) if count == 1 else None
    if target is not None:  # one step further back: the last convolution's input, exactly
        images, error = invert_conv_input(model, target, labels, input_shape, cfg, observe)
    else:
        images, error = invert_features(model, features, labels, input_shape, update, cfg, observe)
    return Reconstruction(images, labels, error, features=features, **counts)


def with_counted_labels(
    readout: Readout, model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], count: int, seed: int
) -> Readout:
    """The readout with the labels of its unchecked rows (mixtures) replaced: the exact readouts keep the labels
    their check found, and the other rows take, in turn, the labels that the last layer's gradient counts
    (attacks.labels) and the exact readouts do not account for."""
    if readout.exact >= len(readout.inputs) or readout.labelled:
        return readout
    left = recover_labels(model, update, input_shape, count, seed, readout.inputs[: readout.exact]).tolist()
    for label in readout.labels[: readout.exact].tolist():
        if label in left:
            left.remove(label)
    rest = len(readout.inputs) - readout.exact
    if not left:
        return readout
    fill = torch.tensor([left[i % len(left)] for i in range(rest)], dtype=readout.labels.dtype)
    return dataclasses.replace(readout, labels=torch.cat([readout.labels[: readout.exact], fill]))
