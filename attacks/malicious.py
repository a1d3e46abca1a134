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

The server sees only the model it sent and the SharedUpdate, and reads the batch with the checked, peeling
readout of attacks/readout.py.

On a CNN (`cnn-wide`) the trap is the first FC layer after the convolutions: the readout gives the conv
features exactly, and attacks/inversion.py finds images with those features and the shared conv gradients.
Before poisoning, a fresh victim gets a short honest training on the auxiliary data (a --from-run victim
keeps its weights), so the client's check (`detect_poisoning`: accuracy of the received model next to the
honest one) means something.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load, save

from attacks import Attack, Observer, Reconstruction, Served
from attacks.inversion import INVERSION_SETTINGS, readout_reconstruction
from attacks.readout import PEEL_ROUNDS, Readout, layer_inputs, on_cpu, read_update, readout_layer
from data_sources import DataSplit
from defenses import SharedUpdate
from utils import UsageError, atomic_write_bytes

if TYPE_CHECKING:
    from config import AttackConfig

FIRING_RATES = (1, 1, 1, 1, 1, 1, 1, 2)  # GIAvMP's neurons fire for this many samples of a batch (cycled). On faces
# (B = 16-128, 3 draws) peeling then reads 98/96/85/81% of a batch against 88/92/80/78% with every neuron at 1, and
# more under prune:0.2 too; denser mixes (up to 8) read more without a defense but leave fewer exact zeros in the
# gradient, so pruning its smallest 20% cut real readouts (41% at B = 32)


def trap_layer(model: nn.Module) -> nn.Linear:
    """The layer both attacks tamper with and read: the readout layer, which must be a hidden one (a ReLU
    layer before the classifier), since the trap needs neurons that stay silent for most samples."""
    layer = readout_layer(model)
    if layer is [m for m in model.modules() if isinstance(m, nn.Linear)][-1]:
        raise UsageError(
            f"the malicious-server attacks need a hidden fully connected layer before the classifier, and "
            f"{type(model).__name__}'s first one is its classifier; use --model fcnn, mlp, cnn or cnn-wide."
        )
    return layer


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


def read_sent(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], num_classes: int) -> Readout:
    """Read the samples off the update of a model the server sent: bins for an imprint, neurons otherwise."""
    combos = bin_differences(model.imprint.groups) if isinstance(model, Imprinted) else None
    return read_update(model, update, input_shape, num_classes, combos)


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


def prepare_giavmp(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, aux: DataSplit, cfg: AttackConfig
) -> Served:
    """GIAvMP's poisoned models, one fitted for each batch size of the study, from the honest global `model`."""
    honest = copy.deepcopy(model).cpu().eval()
    sent = {
        b: giavmp_model(honest, aux.x_train, b, cfg.giavmp_per_sample, cfg.seed, cfg.cache_dir) for b in cfg.batch_sizes
    }
    return Served(honest, sent)


def prepare_rtf(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, aux: DataSplit, cfg: AttackConfig
) -> Served:
    """RtF's imprinted models, one per batch size; with --rtf-measurements 0 each imprint measures as many
    statistics as recover the most of its batch size in simulation (best_measurement_count)."""
    honest = copy.deepcopy(model).cpu().eval()
    sent = {
        b: rtf_model(
            honest, aux.x_train, cfg.rtf_bins, cfg.rtf_measurement, cfg.seed, cfg.rtf_thresholds,
            cfg.rtf_measurements or best_measurement_count(cfg.rtf_bins, [b]),
        )
        for b in cfg.batch_sizes
    }  # fmt: skip
    return Served(honest, sent)


def run_malicious(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """Read the batch off the trap layer (on the CPU: a few small matrix products, with float64 sums); on a
    CNN the readout gives conv features, which are then inverted to images."""
    model, update = on_cpu(model, update)
    readout = read_sent(model, update, input_shape, num_classes)
    return readout_reconstruction(model, readout, update, input_shape, cfg, observe)


SERVER_SETTINGS = ("honest_epochs", "poisoning_max_drop")  # AttackConfig fields both malicious servers read
GIAVMP_SETTINGS = (*SERVER_SETTINGS, "giavmp_per_sample", "cache_dir", *INVERSION_SETTINGS)
RTF_SETTINGS = (*SERVER_SETTINGS, "rtf_bins", "rtf_measurements", "rtf_measurement", "rtf_thresholds")
ATTACKS = {
    "giavmp": Attack(
        run_malicious,
        1,
        prepare_giavmp,
        "GIAvMP: poisoned first FC layer, exact readout from lone neurons",
        GIAVMP_SETTINGS,
        trap_layer,
    ),
    "rtf": Attack(
        run_malicious,
        1,
        prepare_rtf,
        "Robbing the Fed: imprint block, exact readout from lone bins",
        RTF_SETTINGS,
        trap_layer,
    ),
}
