"""Malicious-server attacks that read whole batches off one layer's gradient: GIAvMP and Robbing the Fed.

Both rest on one identity. For a linear layer z = W x + b followed by a ReLU, the gradient of neuron i is
dL/dW_i = sum_s g_si x_s and dL/db_i = sum_s g_si, summed over the samples s that activate it. If exactly
one sample activates it, x = (dL/dW_i) / (dL/db_i) exactly. The server therefore sends a model whose
"trap" layer makes such neurons common:

- `giavmp` (model poisoning) replaces the first fully connected layer by malicious parameters fitted on
  auxiliary data, so that in a batch of B each sample is alone on a few of its neurons;
- `rtf` (Robbing the Fed, Fowl et al. 2021) prepends an imprint block: K ReLU neurons that measure a linear
  statistic h(x) with thresholds at its quantiles, so adjacent neurons' differences isolate bins. The K
  neurons may be split among several uncorrelated statistics: a sample that shares its bin in one is then
  usually alone in another, and peeling (below) frees the sample it shared with.

The server sees only the model it sent and the SharedUpdate. It tells an exact readout from a mixture of
several samples without the private batch: for a candidate x and each label y it recomputes, on the model
it sent, the gradient a lone sample (x, y) would put on that readout, and keeps candidates whose observed
gradient matches it. Known samples are then subtracted from the layer's gradient ("peeling"), which
turns neurons that two samples shared into exact readouts of the second one.

On a CNN (`cnn-wide`) the trap is the first FC layer after the convolutions: the readout gives the conv
features exactly, and `invert_features` finds images with those features and the shared conv gradients.
Before poisoning, a fresh victim gets a short honest training on the auxiliary data (a --from-run victim
keeps its weights), so the client's check (`detect_poisoning`: accuracy of the received model next to the
honest one) means something.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load, save

from attacks import Attack, Observer, Reconstruction, Served, Trajectory, total_variation
from data_sources import DataSplit
from defenses import SharedUpdate, trainable_parameters
from utils import UsageError, atomic_write_bytes

if TYPE_CHECKING:
    from config import AttackConfig

CHECK_TOLERANCE = 2e-5  # relative mismatch below which a readout counts as one sample: float32 readouts of real
# samples stay below ~7e-6, while at 1e-4 one mixture in ~500 checked readouts passed by chance (digits, B = 16)
ROUNDING_MARGIN = 20  # ... plus this many times the readout's own float32 rounding error, relative to it: an RtF
# bin is a difference of two sums over many samples, so a sample with a small gradient (a trained model's
# confident ones) is read with a relative error up to ~1e-2 (digits, K = B = 64), while mixtures miss by > 9e-5
SIGNAL_FLOOR = 1e-5  # readouts below this fraction of the largest carry no sample (peeling leaves ~1e-7)
FIRING_RATES = (1, 1, 1, 1, 1, 1, 1, 2)  # GIAvMP's neurons fire for this many samples of a batch (cycled). On faces
# (B = 16-128, 3 draws) peeling then reads 98/96/85/81% of a batch against 88/92/80/78% with every neuron at 1, and
# more under prune:0.2 too; denser mixes (up to 8) read more without a defense but leave fewer exact zeros in the
# gradient, so pruning its smallest 20% cut real readouts (41% at B = 32)
PEEL_ROUNDS = 8  # peeling converges in 2-4 rounds at B = 128; more rounds find nothing new
INVERSION_LR = 0.2  # first Adam step on pixels in [0, 1] when inverting conv features (GIAvMP on a CNN), decayed
# to 0 on a cosine: +6 dB on digits and faces (B = 16, 3 draws) over a constant 0.05, which converged too slowly
INVERSION_TV = 1e-2  # weight of the total-variation prior in that inversion


@dataclass
class TrapReadout:
    """What the server reads off the trap layer: one row per sample it claims (in the layer's input space),
    best first, and how many readouts passed or failed the single-sample check."""

    inputs: torch.Tensor  # (M, d) exact readouts first, then the best remaining mixtures
    labels: torch.Tensor  # (M,) the label that explains each readout best
    exact: int  # readouts that passed the check (distinct samples)
    collisions: int  # readouts that carry gradient but failed it: several samples shared a neuron/bin
    unexplained: float  # share of the layer's weight gradient not explained by the exact readouts


# --- the trap layer and per-sample gradients on it ---------------------------------------------------


def trap_layer(model: nn.Module) -> nn.Linear:
    """The first fully connected layer that is not the classifier: the layer both attacks read."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise UsageError(
            f"the analytic attacks need a hidden fully connected layer before the classifier, and "
            f"{type(model).__name__} has {len(linears)} linear layer(s); use --model fcnn, mlp or cnn."
        )
    return linears[0]


def trap_gradients(model: nn.Module, update: SharedUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared gradients of the trap layer's weight and bias, found by position in the parameter list."""
    layer = trap_layer(model)
    ids = [id(p) for p in trainable_parameters(model)]
    grads = update.gradients
    return grads[ids.index(id(layer.weight))], grads[ids.index(id(layer.bias))]


class _TrapReached(Exception):
    """Raised by a forward pre-hook to stop a forward pass at the trap layer."""


def trap_inputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The trap layer's input for `images`, differentiable; the forward pass stops there (the layers after
    it would only cost time)."""
    captured: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _TrapReached

    handle = trap_layer(model).register_forward_pre_hook(stop)
    try:
        model(images)
    except _TrapReached:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def layer_inputs(model: nn.Module, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """What the trap layer receives for `images`: flattened pixels for an MLP, conv features for a CNN."""
    return torch.cat([trap_inputs(model, images[i : i + chunk]) for i in range(0, len(images), chunk)])


def preactivation_grads(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...], chunk: int = 2048
) -> torch.Tensor:
    """dL/dz of the trap layer for each (input, label) as a lone sample: what it would add to dL/db.

    The trap layer's input is replaced by `inputs` with a forward pre-hook, so this works whether the
    layer reads pixels (fcnn, imprint) or conv features (cnn; the convolutions then run on one blank image,
    since their output is replaced). Samples do not interact in these models (no BatchNorm), so one summed
    loss gives every per-sample gradient at once."""
    layer = trap_layer(model)
    feeds_pixels = reads_pixels(model, input_shape)
    out = []
    for i in range(0, len(inputs), chunk):
        x, y = inputs[i : i + chunk], labels[i : i + chunk]
        images = x.view(len(x), *input_shape) if feeds_pixels else x.new_zeros(1, *input_shape)  # replaced anyway
        z: list[torch.Tensor] = []
        pre = layer.register_forward_pre_hook(lambda m, args, x=x: (x,))
        post = layer.register_forward_hook(lambda m, args, output, z=z: z.append(output))
        try:
            with torch.enable_grad():
                loss = F.cross_entropy(model(images), y, reduction="sum")
                out.append(torch.autograd.grad(loss, z[0])[0].detach())
        finally:
            pre.remove()
            post.remove()
    return torch.cat(out)


# --- the readout shared by both attacks ---------------------------------------------------------------


def read_trap(
    model: nn.Module,
    grad_w: torch.Tensor,
    grad_b: torch.Tensor,
    batch_size: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    combos: torch.Tensor | None = None,
) -> TrapReadout:
    """Read samples off the trap layer's gradient (a mean over `batch_size` samples).

    `combos` (R, N) are the linear combinations of neurons that isolate samples: the identity for GIAvMP
    (one neuron each), adjacent differences for RtF (one bin each). Each round checks every readout
    against the gradient a lone sample would give, keeps the exact ones (deduplicated: a sample alone on
    several neurons appears several times), subtracts their contribution and reads again.

    Exact readouts are ranked by how many readouts agree on them, then by mismatch: a real sample alone on
    several neurons is read several times with a mismatch near 0, while a mixture that passes the check by
    chance is read once, so it cannot displace a real sample from the first `batch_size` rows."""
    combos = torch.eye(len(grad_b)) if combos is None else combos
    dw, db = grad_w.double() * batch_size, grad_b.double() * batch_size  # sums over the batch
    combos = combos.double()
    floor = SIGNAL_FLOOR * (combos @ db).abs().max().clamp_min(1e-30)
    silent = db.abs() <= SIGNAL_FLOOR * db.abs().max()  # neurons no sample fired
    rounding = rounding_errors(combos, db)
    known_x, known_y, known_rank = [], [], []
    for _ in range(PEEL_ROUNDS):
        cand_x, cand_y, error = _check_readouts(
            model, combos, dw, db, floor, silent, rounding, num_classes, input_shape
        )
        ok = error < 1
        new = _distinct(cand_x[ok], torch.cat(known_x) if known_x else None)
        if not len(new):
            break
        new_x, new_y = cand_x[ok][new], cand_y[ok][new]
        support = (torch.cdist(new_x, cand_x[ok], p=float("inf")) <= 1e-2 * new_x.abs().amax(1, keepdim=True)).sum(1)
        known_rank.append(error[ok][new] - support)  # support first (an integer), mismatch (< 1) breaks ties
        g = preactivation_grads(model, new_x.float(), new_y, input_shape).double()
        dw, db = dw - g.T @ new_x, db - g.sum(0)
        known_x.append(new_x)
        known_y.append(new_y)
    rank = torch.cat(known_rank).argsort() if known_x else torch.zeros(0, dtype=torch.long)
    exact_x = torch.cat(known_x)[rank] if known_x else dw.new_zeros(0, dw.shape[1])
    exact_y = torch.cat(known_y)[rank] if known_y else torch.zeros(0, dtype=torch.long)
    rest = _distinct(cand_x[error.argsort()], exact_x)
    order = error.argsort()[rest]
    total = grad_w.double().norm() * batch_size
    return TrapReadout(
        inputs=torch.cat([exact_x, cand_x[order]]).float(),
        labels=torch.cat([exact_y, cand_y[order]]),
        exact=len(exact_x),
        collisions=len(order),
        unexplained=float(dw.norm() / total.clamp_min(1e-30)),
    )


def rounding_errors(combos: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """The float32 rounding error to expect in each readout's bias gradient: machine epsilon times the
    absolute gradient mass of the neurons it combines. A neuron's mass is estimated as the sum of the
    absolute readouts it contains (for RtF's cumulative neurons, the bins above its threshold), since
    samples of opposite signs cancel in the neuron's own sum but not in its rounding."""
    readouts = (combos @ db).abs()
    masses = torch.linalg.inv(combos).abs() @ readouts
    return torch.finfo(torch.float32).eps * (combos.abs() @ masses)


def _check_readouts(
    model: nn.Module,
    combos: torch.Tensor,
    dw: torch.Tensor,
    db: torch.Tensor,
    floor: torch.Tensor,
    silent: torch.Tensor,
    rounding: torch.Tensor,
    num_classes: int,
    input_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates x = dW/db of the readouts that carry gradient, the best label of each, and its relative
    mismatch between the observed readout and the one a lone sample (x, label) would give, in units of the
    tolerance (below 1: one sample): CHECK_TOLERANCE plus ROUNDING_MARGIN times the readout's `rounding`
    error relative to it. One scalar per readout can match by chance among thousands, so a candidate that
    would fire a `silent` neuron (one that no sample of the batch fired) is no sample of the batch and gets
    an infinite mismatch."""
    obs_w, obs_b = combos @ dw, combos @ db
    rows = (obs_b.abs() > floor).nonzero().squeeze(1)
    rows = rows[obs_b[rows].abs().argsort(descending=True)]  # best conditioned first: they win deduplication
    if not len(rows):
        empty = dw.new_zeros(0)
        return dw.new_zeros(0, dw.shape[1]), empty.long(), empty
    x, observed = obs_w[rows] / obs_b[rows, None], obs_b[rows, None]
    labels = torch.arange(num_classes).repeat(len(rows))
    g = preactivation_grads(model, x.float().repeat_interleave(num_classes, 0), labels, input_shape).double()
    predicted = (g.view(len(rows), num_classes, -1) * combos[rows][:, None, :]).sum(-1)
    error = (predicted - observed).abs() / torch.maximum(predicted.abs(), observed.abs())
    error[((g.view(len(rows), num_classes, -1) != 0) & silent).any(-1)] = math.inf
    error /= CHECK_TOLERANCE + ROUNDING_MARGIN * rounding[rows, None] / observed.abs()
    best = error.min(1)
    return x, best.indices, best.values


def _distinct(x: torch.Tensor, known: torch.Tensor | None, tol: float = 1e-2) -> torch.Tensor:
    """Indices of the rows of x that differ (max abs difference above tol, relative to the row's scale)
    from every earlier kept row and from `known`: one sample alone on several neurons is read once."""
    pool = x if known is None else torch.cat([known, x])
    offset = len(pool) - len(x)
    scale = x.abs().amax(1).clamp_min(1.0)
    same = (torch.cdist(x, pool, p=float("inf")) <= tol * scale[:, None]).tolist()
    keep: list[int] = []
    for i, row in enumerate(same):
        if not any(row[:offset]) and not any(row[offset + j] for j in keep):
            keep.append(i)
    return torch.as_tensor(keep, dtype=torch.long)


# --- GIAvMP: malicious parameters for the first fully connected layer ---------------------------------


def fit_malicious_layer(
    features: torch.Tensor, neurons: int, batch_size: int, per_sample: int, seed: int, pool: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and biases that leave each sample of a batch of `batch_size` alone on a few neurons.

    Each neuron is a random direction whose bias puts its threshold at the 1 - r/B quantile of the
    auxiliary features, so it fires for r samples of a batch on average. Most have r = 1, the rate that
    maximises p (1 - p)^(B - 1), the chance of a lone activation; the others (FIRING_RATES) fire for 2
    samples, so that a sample deep inside the data, which no rarely-firing half-space holds, shares a few
    neurons with samples that peeling (read_trap) subtracts once they are read off their own neurons.
    Fitting on auxiliary data then picks, from `pool` times more directions than neurons, greedily those
    that fire for the auxiliary samples covered least so far, until each is covered `per_sample` times, one
    rate after the other so the rates keep their shares (a rate above B/4 leaves no sample alone and is
    skipped: small batches use r = 1 and 2 only)."""
    rates = [r for r in FIRING_RATES if r <= max(1, batch_size // 4)]
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(pool * neurons, features.shape[1], generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    projections = features @ directions.T
    distinct = sorted(set(rates))
    rate_of = torch.tensor(distinct)[torch.arange(pool * neurons) % len(distinct)]
    thresholds = torch.empty(pool * neurons)
    for rate in distinct:
        columns = rate_of == rate
        thresholds[columns] = torch.quantile(projections[:, columns], 1 - rate / batch_size, dim=0)
    fires = (projections > thresholds).float()
    cover = torch.zeros(len(features))
    chosen = torch.zeros(pool * neurons, dtype=torch.bool)
    for step in range(neurons):
        need = (per_sample - cover).clamp_min(0) + 1e-3  # samples still short of per_sample lone chances
        gain = (fires.T @ need).masked_fill(chosen | (rate_of != rates[step % len(rates)]), -1.0)
        best = int(gain.argmax())
        chosen[best] = True
        cover += fires[:, best]
    return directions[chosen].contiguous(), -thresholds[chosen].contiguous()


def cached_malicious_layer(
    features: torch.Tensor, neurons: int, batch_size: int, per_sample: int, seed: int, cache_dir: Path
) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_malicious_layer, cached on disk under a key of its inputs (the auxiliary features' bytes too)."""
    digest = hashlib.sha256(features.contiguous().numpy().tobytes())
    digest.update(f"{neurons}-{batch_size}-{per_sample}-{seed}-{FIRING_RATES}".encode())
    path = Path(cache_dir) / f"giavmp-{digest.hexdigest()[:16]}.safetensors"
    if path.exists():
        tensors = load(path.read_bytes())
        return tensors["weight"], tensors["bias"]
    weight, bias = fit_malicious_layer(features, neurons, batch_size, per_sample, seed)
    atomic_write_bytes(path, save({"weight": weight, "bias": bias}))
    return weight, bias


def poison(model: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of `model` whose trap layer carries the malicious parameters: the model the server sends."""
    sent = copy.deepcopy(model)
    layer = trap_layer(sent)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return sent


# --- Robbing the Fed: the imprint block -------------------------------------------------------------


class ImprintBlock(nn.Module):
    """K ReLU neurons in groups, each group measuring one linear statistic h(x) = m . x at increasing
    thresholds, and a layer back to the input size whose columns are all equal, so every neuron passes the
    same gradient back: neuron k fires for h(x) > t_k, and neuron k minus neuron k + 1 of the same group
    isolates the samples of bin [t_k, t_k+1). The block adds its output to the input, so the model behind
    it still sees the image. `groups` holds the group sizes (bins per measurement)."""

    def __init__(self, measurements: torch.Tensor, thresholds: torch.Tensor, scale: float, groups: list[int]):
        super().__init__()
        bins, size = measurements.shape
        self.groups = groups
        self.linear0 = nn.Linear(size, bins)
        self.linear1 = nn.Linear(bins, size)
        with torch.no_grad():
            self.linear0.weight.copy_(measurements)
            self.linear0.bias.copy_(-thresholds)
            self.linear1.weight.fill_(scale)
            self.linear1.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear1(F.relu(self.linear0(x.flatten(1)))).view_as(x)


class Imprinted(nn.Module):
    """An imprint block in front of an ordinary model."""

    def __init__(self, imprint: ImprintBlock, model: nn.Module):
        super().__init__()
        self.imprint = imprint
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.imprint(x))


def simulated_recovery(batch_size: int, groups: list[int], draws: int = 200, seed: int = 0) -> float:
    """Expected share of a batch the RtF readout recovers when every sample falls in a uniformly random bin
    of each group, independently: samples alone in a bin are read, then subtracted from every group
    (peeling), which can leave the other sample of a shared bin alone, and so on (at most PEEL_ROUNDS)."""
    rng = np.random.default_rng(seed)
    recovered = 0.0
    for _ in range(draws):
        bins = np.stack([rng.integers(0, size, batch_size) for size in groups], 1)
        known = np.zeros(batch_size, dtype=bool)
        for _ in range(PEEL_ROUNDS):
            lone = np.zeros(batch_size, dtype=bool)
            for g, size in enumerate(groups):
                counts = np.bincount(bins[~known, g], minlength=size)
                lone |= ~known & (counts[bins[:, g]] == 1)
            if not lone.any():
                break
            known |= lone
        recovered += known.mean()
    return recovered / draws


def split_bins(bins: int, measurements: int) -> list[int]:
    """`bins` neurons shared out as evenly as possible among `measurements` groups."""
    return [bins // measurements + (i < bins % measurements) for i in range(measurements)]


def best_measurement_count(bins: int, batch_sizes: list[int], most: int = 4) -> int:
    """How many statistics the imprint should measure with `bins` neurons: the count whose simulated
    recovery, averaged over the batch sizes the server expects, is highest (fewer on a tie within 0.005).
    One statistic gives the uniform-binning rate (1 - 1/K)^(B - 1); for B well below K, two or more
    statistics of K/m bins each recover nearly everything, since peeling resolves most shared bins."""
    counts = [m for m in range(1, most + 1) if bins // m >= 2]
    scores = [np.mean([simulated_recovery(b, split_bins(bins, m)) for b in batch_sizes]) for m in counts]
    return next(m for m, score in zip(counts, scores, strict=True) if score >= max(scores) - 0.005)


def measurement_directions(flat: torch.Tensor, count: int, measurement: str, seed: int) -> torch.Tensor:
    """`count` unit directions: the first the mean pixel ("brightness") or random, the rest random, each made
    uncorrelated on the auxiliary images with the ones before (Gram-Schmidt in their covariance), so that a
    sample's bins in different groups are close to independent draws."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(count, flat.shape[1], generator=gen, dtype=torch.float64)
    if measurement == "brightness":
        directions[0] = 1.0
    elif measurement != "random":
        raise UsageError(f"unknown RtF measurement '{measurement}'; choose brightness or random.")
    projections = (flat - flat.mean(0)).double() @ directions.T  # each direction's centred statistic
    for i in range(1, count):
        for j in range(i):
            p = projections[:, j]
            coef = (projections[:, i] @ p) / (p @ p).clamp_min(1e-30)
            directions[i] -= coef * directions[j]
            projections[:, i] -= coef * p
    return (directions / directions.norm(dim=1, keepdim=True)).float()


def bin_thresholds(h: torch.Tensor, bins: int, thresholds: str) -> torch.Tensor:
    """Thresholds at the k/K quantiles of h's distribution, the first far below every sample so each falls in
    some bin. "gaussian" fits h's mean and std and takes the normal quantiles, as Fowl et al. assume a known
    distribution (with ~100 auxiliary images the empirical k/K quantiles are noisy and leave uneven bins);
    "empirical" takes the auxiliary images' own quantiles."""
    quantiles = torch.arange(bins, dtype=torch.float64) / bins
    if thresholds == "gaussian":
        cuts = torch.distributions.Normal(h.double().mean(), h.double().std()).icdf(quantiles.clamp_min(1e-12)).float()
    elif thresholds == "empirical":
        cuts = torch.quantile(h, quantiles.float())
    else:
        raise UsageError(f"unknown RtF thresholds '{thresholds}'; choose gaussian or empirical.")
    cuts[0] = h.min() - 10 * (h.max() - h.min())
    return cuts


def bin_differences(groups: list[int]) -> torch.Tensor:
    """The RtF readout combinations: in each group, neuron k minus neuron k + 1 (its last bin is its own neuron)."""
    return torch.block_diag(*[torch.eye(n) - torch.diag(torch.ones(n - 1), 1) for n in groups])


# --- the attacks: what the server sends, and what it reads back ---------------------------------------


def giavmp_model(
    model: nn.Module, aux_images: torch.Tensor, batch_size: int, per_sample: int, seed: int, cache_dir: Path
) -> nn.Module:
    """The poisoned model GIAvMP sends: malicious first FC layer fitted on the auxiliary images' inputs to it."""
    neurons = trap_layer(model).out_features
    weight, bias = cached_malicious_layer(
        layer_inputs(model, aux_images), neurons, batch_size, per_sample, seed, cache_dir
    )
    return poison(model, weight, bias)


def rtf_model(
    model: nn.Module,
    aux_images: torch.Tensor,
    bins: int,
    measurement: str,
    seed: int,
    thresholds: str = "gaussian",
    measurements: int = 1,
) -> Imprinted:
    """The model RtF sends: an imprint of `bins` neurons over `measurements` statistics (split_bins), with
    thresholds from the auxiliary images, in front of the honest model. `measurement`: "brightness" (mean
    pixel) or "random" for the first statistic.

    The back layer's weight is scaled so that the block shifts pixels by at most 0.1 on the auxiliary
    images: large enough for float32 readouts, small enough that the model behind it keeps working and
    a training step stays finite (the weights of the original block made training diverge)."""
    flat = aux_images.flatten(1)
    groups = split_bins(bins, measurements)
    directions = measurement_directions(flat, measurements, measurement, seed)
    rows = directions.repeat_interleave(torch.as_tensor(groups), dim=0)
    cuts = torch.cat([bin_thresholds(flat @ m, size, thresholds) for m, size in zip(directions, groups, strict=True)])
    largest = F.relu(flat @ rows.T - cuts).sum(1).max()
    return Imprinted(ImprintBlock(rows, cuts, scale=0.1 / float(largest), groups=groups), copy.deepcopy(model))


def read_update(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], num_classes: int) -> TrapReadout:
    """Read the samples off the update of a model the server sent: bins for an imprint, neurons otherwise.
    Under secure aggregation the update sums several clients' mean gradients, read as one larger batch."""
    grad_w, grad_b = trap_gradients(model, update)
    combos = bin_differences(model.imprint.groups) if isinstance(model, Imprinted) else None
    batch = update.batch_size * update.num_clients
    scale = 1.0 / update.num_clients
    return read_trap(model, grad_w * scale, grad_b * scale, batch, num_classes, input_shape, combos)


def readout_rows(readout: TrapReadout, count: int, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` readouts (exact ones first) and their labels; where there are too few, `fill`
    (or the mean readout) stands in for the missing rows."""
    n = min(count, len(readout.inputs))
    rows = torch.full((count, readout.inputs.shape[1]), 0.0 if fill is None else fill)
    if fill is None and n:
        rows[:] = readout.inputs[:n].mean(0)
    labels = torch.zeros(count, dtype=torch.long)
    rows[:n], labels[:n] = readout.inputs[:n], readout.labels[:n]
    return rows, labels


def readout_images(readout: TrapReadout, count: int, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images in [0, 1] from a pixel-space readout, exact ones first; mid-grey where it has too few."""
    rows, labels = readout_rows(readout, count, fill=0.5)
    return rows.view(count, *input_shape).clamp(0, 1), labels


@torch.no_grad()
def detect_poisoning(
    honest: nn.Module, sent: nn.Module, images: torch.Tensor, labels: torch.Tensor, max_drop: float = 0.1
) -> dict[str, float | bool]:
    """The client's side: accuracy of the received model next to the honest one on its own held-out data,
    and a simple detector that flags the received model when accuracy falls by more than `max_drop`."""
    honest_acc = float((honest(images).argmax(1) == labels).float().mean())
    sent_acc = float((sent(images).argmax(1) == labels).float().mean())
    return {
        "honest_accuracy": honest_acc,
        "received_accuracy": sent_acc,
        "poisoning_detected": honest_acc - sent_acc > max_drop,
    }


# --- the registry entries (gradient_attack.py calls prepare once per attack, run once per batch) ------


def honest_training(model: nn.Module, aux: DataSplit, epochs: int, seed: int) -> nn.Module:
    """A copy of `model` after `epochs` of plain Adam training on the auxiliary training split: the global
    model an honest server would send. The detector needs it: next to a fresh model at chance accuracy a
    poisoned one loses nothing, so its collapse could not show."""
    torch.manual_seed(seed)
    trained = copy.deepcopy(model).cpu().train()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(aux.x_train)).split(32):
            loss = F.cross_entropy(trained(aux.x_train[batch]), aux.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return trained.eval()


def _honest_model(model: nn.Module, aux: DataSplit, cfg: AttackConfig) -> nn.Module:
    """The victim's trained weights under --from-run, else a short honest training of the fresh model."""
    if cfg.from_run is not None:
        return copy.deepcopy(model).cpu().eval()
    return honest_training(model, aux, cfg.honest_epochs, cfg.seed)


def prepare_giavmp(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, aux: DataSplit, cfg: AttackConfig
) -> Served:
    """GIAvMP's poisoned models, one fitted for each batch size of the study."""
    honest = _honest_model(model, aux, cfg)
    sent = {
        b: giavmp_model(honest, aux.x_train, b, cfg.giavmp_per_sample, cfg.seed, cfg.cache_dir) for b in cfg.batch_sizes
    }
    return Served(honest, sent)


def prepare_rtf(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, aux: DataSplit, cfg: AttackConfig
) -> Served:
    """RtF's imprinted models, one per batch size; with --rtf-measurements 0 each imprint measures as many
    statistics as recover the most of its batch size in simulation (best_measurement_count)."""
    honest = _honest_model(model, aux, cfg)
    sent = {
        b: rtf_model(
            honest, aux.x_train, cfg.rtf_bins, cfg.rtf_measurement, cfg.seed, cfg.rtf_thresholds,
            cfg.rtf_measurements or best_measurement_count(cfg.rtf_bins, [b]),
        )
        for b in cfg.batch_sizes
    }  # fmt: skip
    return Served(honest, sent)


def reads_pixels(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the trap layer reads the flattened image (fcnn, imprint) rather than conv features (cnn)."""
    probe = torch.rand(1, *input_shape, generator=torch.Generator().manual_seed(0))
    inputs = layer_inputs(model, probe)
    return inputs.shape == probe.flatten(1).shape and torch.equal(inputs, probe.flatten(1))


def conv_gradient_error(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...], update: SharedUpdate
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gradient-matching term of the CNN inversion, as a function of a batch of images: the relative L2
    error, summed over the parameters in front of the trap layer, between their shared gradient and the one
    these images would give. Features and labels are exact, so each sample's dL/dfeature is known and that
    gradient is one vector-Jacobian product of the images' features; it is 0 at the private batch."""
    frozen = copy.deepcopy(model).requires_grad_(False)
    trap = trap_layer(model)
    shared = trainable_parameters(model)
    before = shared[: [id(p) for p in shared].index(id(trap.weight))]
    names = {id(p): n for n, p in model.named_parameters()}
    params = [dict(frozen.named_parameters())[names[id(p)]].requires_grad_(True) for p in before]
    targets = [g.cpu() / update.num_clients for g in update.gradients[: len(before)]]  # a mean over all samples
    deltas = preactivation_grads(model, features, labels, input_shape) @ trap.weight.detach() / len(features)

    def error(images: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad((trap_inputs(frozen, images) * deltas).sum(), params, create_graph=True)
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
    """Images whose conv features match the features read exactly off the poisoned FC layer and whose
    conv-layer gradients match the shared ones: GIAvMP's CNN variant, gradient + feature matching.

    Adam on the pixels, kept in [0, 1], on the relative feature error plus a TV prior, with the pull of
    conv_gradient_error added, rescaled per image to --giavmp-gradient-weight times the feature term's: at
    a fixed weight it is far steeper and rougher and swamps the feature term (which measured worse).
    Rescaled, it measured level with feature matching alone (within 0.5 dB) at 2-3x the cost: the exact
    features already pin down most of what the convolutions saw. Returns the images and the final
    feature error."""
    frozen = copy.deepcopy(model).requires_grad_(False)
    weight = cfg.giavmp_gradient_weight  # 0: feature matching alone, with no gradient term to build
    gradient_error = conv_gradient_error(model, features, labels, input_shape, update) if weight else None
    gen = torch.Generator().manual_seed(cfg.seed)
    dummy = (0.5 + 0.05 * torch.randn(len(features), *input_shape, generator=gen)).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=INVERSION_LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.giavmp_inversion_steps)
    scale = features.pow(2).sum(1).mean().clamp_min(1e-12)
    per_image = (-1, *[1] * len(input_shape))
    trajectory = Trajectory(cfg.giavmp_inversion_steps, cfg.log_every)
    for step in range(cfg.giavmp_inversion_steps + 1):
        feature_error = (trap_inputs(frozen, dummy) - features).pow(2).sum(1).mean() / scale
        trajectory.log(step, dummy, labels, feature_error.item())
        if step == cfg.giavmp_inversion_steps:
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


def run_analytic(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """Read the batch off the trap layer; the loss is the share of its gradient left unexplained. On a CNN
    the readout gives conv features, which are then inverted to images (invert_features; its loss is the
    final feature error). The readout runs on the CPU (a few small matrix products, with float64 sums)."""
    cpu_model = copy.deepcopy(model).cpu()
    cpu_update = dataclasses.replace(update, gradients=tuple(g.cpu() for g in update.gradients))
    readout = read_update(cpu_model, cpu_update, input_shape, num_classes)
    count = update.batch_size * update.num_clients
    if reads_pixels(cpu_model, input_shape):
        images, labels = readout_images(readout, count, input_shape)
        observe(1, images, labels, readout.unexplained)
        return Reconstruction(images, labels, readout.unexplained, exact=readout.exact, collisions=readout.collisions)
    features, labels = readout_rows(readout, count)
    images, error = invert_features(cpu_model, features, labels, input_shape, cpu_update, cfg, observe)
    return Reconstruction(images, labels, error, exact=readout.exact, collisions=readout.collisions)


ATTACKS = {
    "giavmp": Attack(
        run_analytic, 1, prepare_giavmp, "GIAvMP: poisoned first FC layer, exact readout from lone neurons"
    ),
    "rtf": Attack(run_analytic, 1, prepare_rtf, "Robbing the Fed: imprint block, exact readout from lone bins"),
}
