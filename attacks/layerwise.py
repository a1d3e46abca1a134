"""One layer further back than the readout: the input of the last convolution, recovered in closed form from its
weight gradient, then the images from it through a smoothed copy of the layers in front.

For a lone sample, a convolution's weight gradient is G = D P, with D (C_out x L) the gradient at its L output
positions and P (L x C_in k^2) the patches of its input h. Where C_out >= L (a CNN's last convolution sees a small
map: the cnn's conv3 has 64 channels over 6 x 6 = 36 positions), every patch of h lies in the L-dimensional row
space of G, so h spans the null space of one linear map and is found up to its scale, which the exact features
read off the FC layer then fix (Zhu & Blaschko's R-GAP does the same step back, layer by layer). Gradient
matching in pixel space stalls on this ReLU/max-pool network (its loss jumps wherever a mask flips), so the
images are fitted to h through the layers in front with ReLU and max-pool replaced by softplus and a
softmax-weighted pool whose temperature anneals to the exact network, coarse to fine (half resolution first),
with restarts batched and the best few averaged. On the cnn trained on faces this takes the face images from
17-22 dB (feature or gradient matching) to 24-29 dB.
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks import Observer, Trajectory, total_variation
from attacks.readout import readout_inputs, readout_layer
from defenses import SharedUpdate, trainable_parameters

if TYPE_CHECKING:
    from config import AttackConfig

MAX_UNKNOWNS = 4096  # the null-space step is an SVD of a (C_in k^2 L) x (C_in H W) matrix: keep it small
SCALE_TOLERANCE = 1e-3  # relative feature error above which the recovered input is not the sample's (a defense)
LR = 0.05  # Adam on pixels in [0, 1], cosine-decayed in each resolution phase
TEMPERATURES = (0.3, 1e-3)  # softplus 1/beta and pool temperature, annealed geometrically ...
EXACT_TAIL = 0.2  # ... then the exact ReLU / max-pool network for this share of the steps
TV_WEIGHTS = (1e-2, 3e-4)  # total-variation weight, annealed geometrically over the whole run
COARSE_SHARE = 0.3  # the first 30 % of the steps optimise a half-resolution image, upsampled
# (measured by a study of these choices on the faces cnn: coarse-to-fine +2 dB on the hard images, annealed TV
# +1-2 dB, averaging the best third of the restarts +1 dB; lr, the temperature range and float64 within noise)


def last_convolution(model: nn.Module) -> nn.Conv2d | None:
    """The last trainable convolution in front of the readout layer, or None (an MLP, a frozen backbone)."""
    stop = readout_layer(model)
    last = None
    for module in model.modules():
        if module is stop:
            return last
        if isinstance(module, nn.Conv2d) and module.weight.requires_grad:
            last = module
    return None


def features_from(
    model: nn.Module, conv: nn.Conv2d, inputs: torch.Tensor, input_shape: tuple[int, ...]
) -> torch.Tensor:
    """The readout layer's input when `conv` receives `inputs`: the network from that convolution on."""
    handle = conv.register_forward_pre_hook(lambda module, args: (inputs,))
    try:
        return readout_inputs(model, inputs.new_zeros(len(inputs), *input_shape))
    finally:
        handle.remove()


def recover_conv_input(
    model: nn.Module, update: SharedUpdate, features: torch.Tensor, input_shape: tuple[int, ...]
) -> torch.Tensor | None:
    """The input of the last convolution for a lone sample (1, C_in, H, W), or None where the step does not
    apply (a batch, too many output positions, too large an input) or does not explain the features exactly
    (a defense distorted the gradient)."""
    conv = last_convolution(model)
    if conv is None or update.batch_size * update.num_clients != 1 or conv.groups != 1:
        return None
    shape = readout_inputs(model, torch.zeros(1, *input_shape), conv).shape[1:]  # what the convolution receives
    positions = math.prod(conv(torch.zeros(1, *shape)).shape[2:])
    if conv.out_channels < positions or math.prod(shape) > MAX_UNKNOWNS:
        return None
    ids = [id(p) for p in trainable_parameters(model)]
    gradient = update.gradients[ids.index(id(conv.weight))].double().flatten(1)
    rows = torch.linalg.svd(gradient, full_matrices=False).Vh[:positions]  # the patches' row space
    outside = torch.eye(gradient.shape[1], dtype=torch.float64) - rows.T @ rows
    basis = torch.eye(math.prod(shape), dtype=torch.float64).view(-1, *shape)
    patches = F.unfold(basis, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (unknowns, C k^2, L)
    residual = torch.einsum("ukl,kj->ulj", patches, outside).flatten(1).T  # patches' parts outside the row space
    direction = torch.linalg.svd(residual, full_matrices=False).Vh[-1].view(1, *shape)
    direction = direction if direction.sum() >= 0 else -direction
    scale, error = fit_scale(lambda s: features_from(model, conv, (s * direction).float(), input_shape), features)
    return (scale * direction).float() if error < SCALE_TOLERANCE else None


@torch.no_grad()
def fit_scale(features_at, target: torch.Tensor) -> tuple[float, float]:
    """The scale s > 0 whose features_at(s) match the target best (a log grid, then golden-section search),
    and the relative error there."""
    error = lambda s: float((features_at(s) - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))
    grid = torch.logspace(-3, 4, 57).tolist()
    best = min(grid, key=error)
    low, high = best / 1.35, best * 1.35
    for _ in range(60):
        a, b = low + 0.382 * (high - low), low + 0.618 * (high - low)
        low, high = (low, b) if error(a) < error(b) else (a, high)
    scale = (low + high) / 2
    return scale, error(scale)


class Temperature:
    """The annealed temperature the smoothed layers share (None: the exact network)."""

    tau: float | None = None


class SoftReLU(nn.Module):
    """softplus with beta = 1 / tau: ReLU as tau -> 0."""

    def __init__(self, temperature: Temperature):
        super().__init__()
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.temperature.tau
        return F.relu(x) if tau is None else F.softplus(x, beta=1 / tau)


class SoftMaxPool(nn.Module):
    """Each window's softmax(x / tau)-weighted mean: max-pooling as tau -> 0, with a gradient to every entry."""

    def __init__(self, pool: nn.MaxPool2d, temperature: Temperature):
        super().__init__()
        self.pool, self.temperature = pool, temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tau = self.temperature.tau
        if tau is None:
            return self.pool(x)
        n, c, h, w = x.shape
        (kh, kw), (sh, sw) = _pair(self.pool.kernel_size), _pair(self.pool.stride)
        windows = F.unfold(x.reshape(n * c, 1, h, w), (kh, kw), stride=(sh, sw))  # (n c, kh kw, positions)
        out = (torch.softmax(windows / tau, 1) * windows).sum(1)
        return out.view(n, c, (h - kh) // sh + 1, (w - kw) // sw + 1)


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def smoothed_front(model: nn.Module, conv: nn.Conv2d) -> tuple[nn.Module, nn.Conv2d, Temperature]:
    """A frozen copy of `model` whose ReLUs and unpadded max-pools read a shared temperature, and the copy of
    `conv` (the front is everything up to its input)."""
    name = next(n for n, m in model.named_modules() if m is conv)
    smooth = copy.deepcopy(model).requires_grad_(False)
    temperature = Temperature()
    for parent in list(smooth.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, SoftReLU(temperature))
            elif isinstance(child, nn.MaxPool2d) and child.padding == 0 and child.dilation == 1 and not child.ceil_mode:
                setattr(parent, child_name, SoftMaxPool(child, temperature))
    return smooth, smooth.get_submodule(name), temperature


def invert_conv_input(
    model: nn.Module,
    target: torch.Tensor,
    labels: torch.Tensor,
    input_shape: tuple[int, ...],
    cfg: AttackConfig,
    observe: Observer,
) -> tuple[torch.Tensor, float]:
    """An image whose input to the last convolution is `target`: cfg.inversion_restarts restarts as one batch
    through the smoothed front, coarse to fine; the answer is the mean of the best third of the restarts by
    their exact relative error, which is returned with it."""
    smooth, conv, temperature = smoothed_front(model, last_convolution(model))
    front = lambda images: readout_inputs(smooth, images, conv)
    steps, restarts = cfg.inversion_steps, cfg.inversion_restarts
    height, width = input_shape[-2:]
    coarse = torch.rand(restarts, *input_shape[:-2], (height + 1) // 2, (width + 1) // 2,
                        generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    upsample = lambda z: F.interpolate(z, size=(height, width), mode="bilinear", align_corners=True)
    scale = target.pow(2).sum()
    errors = lambda images: (front(images) - target).pow(2).flatten(1).sum(1) / scale
    trajectory = Trajectory(steps, cfg.log_every)
    smooth_steps, first = steps - int(EXACT_TAIL * steps), int(COARSE_SHARE * steps)
    step = 0
    for phase_steps, variable in ((first, coarse), (steps - first, None)):
        variable = (upsample(coarse.detach()).clamp(0, 1) if variable is None else variable).requires_grad_(True)
        optimizer = torch.optim.Adam([variable], lr=LR)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(phase_steps, 1))
        for _ in range(phase_steps):
            images = upsample(variable) if variable.shape[-2:] != (height, width) else variable
            progress = min(1.0, step / max(smooth_steps - 1, 1))
            temperature.tau = None if step >= smooth_steps else _geometric(TEMPERATURES, progress)
            tv = _geometric(TV_WEIGHTS, step / max(steps - 1, 1))
            loss = errors(images) + tv * torch.stack([total_variation(image[None]) for image in images])
            if step in trajectory.points:
                best = int(loss.argmin())
                trajectory.log(step, images[best : best + 1], labels, float(loss[best].detach()))
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                variable.clamp_(0, 1)
            step += 1
    temperature.tau = None
    with torch.no_grad():
        final = errors(variable)
        keep = final.argsort()[: max(1, restarts // 3)]
        image = variable[keep].mean(0, keepdim=True)
        error = float(errors(image)[0])
    trajectory.log(steps, image, labels, error)
    trajectory.finish()
    for record in trajectory.records:
        observe(*record)
    return image, error


def _geometric(bounds: tuple[float, float], progress: float) -> float:
    start, end = bounds
    return start * (end / start) ** progress
