"""The exact readout of a fully connected layer's input from its gradient, shared by every analytic attack.

For a linear layer z = W x + b, the gradient of neuron i is dL/dW_i = sum_s g_si x_s and dL/db_i = sum_s g_si,
summed over the samples s whose gradient reaches it. If exactly one sample reaches it, x = (dL/dW_i) / (dL/db_i)
exactly. At batch size 1 every neuron does, so the whole weight gradient is the rank-one b x^T and the layer's
input (the image for an MLP, the conv features for a CNN, the backbone features for a frozen-backbone head)
comes back exactly (`rank_one_readout`). For a batch, the readout needs neurons that a single sample activates,
which a malicious server plants (attacks/malicious.py) and an honest ReLU layer has by chance.

The server tells an exact readout from a mixture of several samples without the private batch: for a candidate
x and each label y it recomputes, on the model it holds, the gradient a lone sample (x, y) would put on that
readout, and keeps candidates whose observed gradient matches it. Known samples are then subtracted from the
layer's gradient ("peeling"), which turns neurons that two samples shared into exact readouts of the second one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from attacks.labels import last_layer_gradients
from defenses import SharedUpdate, trainable_parameters
from utils import UsageError

CHECK_TOLERANCE = 2e-5  # relative mismatch below which a readout counts as one sample: float32 readouts of real
# samples stay below ~7e-6, while at 1e-4 one mixture in ~500 checked readouts passed by chance (digits, B = 16)
ROUNDING_MARGIN = 20  # ... plus this many times the readout's own float32 rounding error, relative to it: an RtF
# bin is a difference of two sums over many samples, so a sample with a small gradient (a trained model's
# confident ones) is read with a relative error up to ~1e-2 (digits, K = B = 64), while mixtures miss by > 9e-5
SLACK_CAP = 5e-2  # ... but a readout whose tolerance, so widened, passes this share of it is not checked at all:
# a trained layer's late rounds left a mixture of two confident faces (same label, so the same ratio on every
# neuron) at a tolerance of 0.33 that passed; true samples were taken at up to 0.14 (faces/digits, B = 32-128)
SIGNAL_FLOOR = 1e-5  # readouts below this fraction of the largest carry no sample (peeling leaves ~1e-7)
PEEL_ROUNDS = 8  # a malicious layer's peeling converges in 2-4 rounds at B = 128; more rounds find nothing new
FIRING_MARGIN = 1e-4  # a candidate "fires" a neuron only this far (relative to the pre-activation's scale) above
# 0: a sample whose pre-activation is within float32 rounding of 0 may flip in its readout (faces, honest fcnn)
ALTERNATING_STEPS = 30  # rank-one readout: exact data converge in 1-3; noisy ones settle within ~20


@dataclass
class Readout:
    """What the server reads off the readout layer: one row per sample it claims (in the layer's input space),
    best first, and how many readouts passed or failed the single-sample check."""

    inputs: torch.Tensor  # (M, d) exact readouts first, then the best remaining mixtures
    labels: torch.Tensor  # (M,) the label that explains each readout best
    exact: int  # readouts that passed the check (distinct samples)
    collisions: int  # readouts that carry gradient but failed it: several samples shared a neuron/bin
    unexplained: float  # share of the layer's weight gradient not explained by the exact readouts
    labelled: bool = False  # every row's label was read (attacks/multistep.py), none is to be recounted


# --- the readout layer and per-sample gradients on it ------------------------------------------------


def readout_layer(model: nn.Module) -> nn.Linear:
    """The first fully connected layer with a bias that the client trains: the fcnn's hidden layer, the cnn's
    FC layer after the convolutions, LeNet's classifier, a frozen backbone's head, RtF's imprint."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None and module.weight.requires_grad:
            return module
    raise UsageError(
        f"{type(model).__name__} has no trainable fully connected layer with a bias, so no analytic readout "
        "applies; use an optimisation attack (ig, dlg) instead."
    )


def readout_gradients(model: nn.Module, update: SharedUpdate) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared gradients of the readout layer's weight and bias, found by position in the parameter list."""
    layer = readout_layer(model)
    ids = [id(p) for p in trainable_parameters(model)]
    grads = update.gradients
    return grads[ids.index(id(layer.weight))], grads[ids.index(id(layer.bias))]


def rank_one_readout(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor, weight: torch.Tensor | None = None, kappa: float = 0.0
) -> torch.Tensor:
    """The readout layer's input x for a lone sample, from dL/dW = b x^T and dL/db = b: the rank-one fit of
    both, counting only the entries that were shared (a pruned or top-k update zeroes the others).

    Without a defense every neuron gives x exactly (x_j = sum_i b_i W_ij / sum_i b_i^2). Under noise or
    quantization, b is as distorted as W, so the fit alternates between x (per input coordinate, over the
    neurons) and b (per neuron, over its weights and its bias): the least-squares rank-one fit of the
    distorted pair, which averages the error over all entries instead of trusting the noisy b.

    Under the regularized loss (PDP-SGD, penalty weight kappa > 0) the client's weight gradient is
    b x^T + 2 kappa W * x^2, with W the layer's weights (which the server sent), so each x_j is the
    least-squares root of b_i x_j + 2 kappa W_ij x_j^2 = dL/dW_ij, found by Gauss-Newton steps."""
    d, db = weight_grad.double(), bias_grad.double()
    shared, bias_shared = (d != 0).double(), (db != 0).double()
    c = 2 * kappa * weight.double() if kappa and weight is not None else torch.zeros_like(d)
    b = db[:, None]
    x = (b * d * shared).sum(0) / (b.pow(2) * shared).sum(0).clamp_min(1e-300)
    for _ in range(ALTERNATING_STEPS):
        slope = (b + 2 * c * x) * shared  # Gauss-Newton in x, per coordinate, for the current b
        residual = (b * x + c * x.pow(2) - d) * shared
        x = x - (slope * residual).sum(0) / slope.pow(2).sum(0).clamp_min(1e-300)
        target = ((d - c * x.pow(2)) * x * shared).sum(1) + bias_shared * db  # then b, per neuron, for this x
        b = (target / ((x.pow(2) * shared).sum(1) + bias_shared).clamp_min(1e-300))[:, None]
    read = (b.pow(2) * shared).sum(0) > 0  # a coordinate no shared entry carries stays 0
    return torch.where(read, x, torch.zeros_like(x)).float()


class _Reached(Exception):
    """Raised by a forward pre-hook to stop a forward pass at the readout layer."""


def frozen_copy(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """A copy of `model` with every parameter frozen (so differentiating through it with respect to images
    builds no parameter gradients), and the copy's readout layer (which, frozen, no longer looks trainable)."""
    layer = readout_layer(model)
    name = next(n for n, m in model.named_modules() if m is layer)
    frozen = copy.deepcopy(model).requires_grad_(False)
    return frozen, frozen.get_submodule(name)


def readout_inputs(model: nn.Module, images: torch.Tensor, layer: nn.Linear | None = None) -> torch.Tensor:
    """The readout layer's input for `images`, differentiable; the forward pass stops there (the layers
    after it would only cost time)."""
    captured: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        raise _Reached

    handle = (layer or readout_layer(model)).register_forward_pre_hook(stop)
    try:
        model(images)
    except _Reached:
        pass
    finally:
        handle.remove()
    return captured[0]


@torch.no_grad()
def layer_inputs(model: nn.Module, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """What the readout layer receives for `images`: pixels for an MLP, conv or backbone features otherwise."""
    return torch.cat([readout_inputs(model, images[i : i + chunk]) for i in range(0, len(images), chunk)])


def forward_from_layer(
    model: nn.Module, inputs: torch.Tensor, input_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the readout layer's pre-activations z when the layer receives `inputs`.

    The layer's input is replaced by `inputs` with a forward pre-hook, so this works whether the layer reads
    pixels (fcnn, imprint) or conv features (cnn; the convolutions then run on one blank image, since their
    output is replaced)."""
    layer = readout_layer(model)
    images = inputs.view(len(inputs), *input_shape) if reads_pixels(model, input_shape) else None
    images = inputs.new_zeros(1, *input_shape) if images is None else images  # replaced anyway
    z: list[torch.Tensor] = []
    pre = layer.register_forward_pre_hook(lambda m, args: (inputs,))
    post = layer.register_forward_hook(lambda m, args, output: z.append(output))
    try:
        logits = model(images)
    finally:
        pre.remove()
        post.remove()
    return logits, z[0]


def preactivation_grads(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, input_shape: tuple[int, ...], chunk: int = 2048
) -> torch.Tensor:
    """dL/dz of the readout layer for each (input, label) as a lone sample: what it would add to dL/db.
    Samples do not interact in these models (no BatchNorm), so one summed loss gives every per-sample
    gradient at once."""
    out = []
    for i in range(0, len(inputs), chunk):
        with torch.enable_grad():
            logits, z = forward_from_layer(model, inputs[i : i + chunk], input_shape)
            loss = F.cross_entropy(logits, labels[i : i + chunk], reduction="sum")
            out.append(torch.autograd.grad(loss, z)[0].detach())
    return torch.cat(out)


# --- the readout shared by both attacks ---------------------------------------------------------------


def read_layer(
    model: nn.Module,
    grad_w: torch.Tensor,
    grad_b: torch.Tensor,
    batch_size: int,
    num_classes: int,
    input_shape: tuple[int, ...],
    combos: torch.Tensor | None = None,
    rounds: int = PEEL_ROUNDS,
    factorise: bool = False,
    head_errors: torch.Tensor | None = None,
) -> Readout:
    """Read samples off the readout layer's gradient (a mean over `batch_size` samples).

    `combos` (R, N) are the linear combinations of neurons that isolate samples: the identity for GIAvMP
    (one neuron each), adjacent differences for RtF (one bin each). Each round checks every readout
    against the gradient a lone sample would give, keeps the exact ones, subtracts their contribution and
    reads again.

    Exact readouts are ranked by how many readouts agree on them, then by mismatch: a real sample alone on
    several neurons is read several times with a mismatch near 0, while a mixture that passes the check by
    chance is read once, so it cannot displace a real sample from the first `batch_size` rows. In that order
    each is taken only if it still passes the check once the samples taken before it are peeled
    (`_explained_in_turn`): a sample read on several neurons is taken once, even where the float32 rounding
    of what was peeled before leaves its readouts a few 1e-2 apart.

    An honest layer needs more `rounds` (up to ~20 at B = 128: each round frees a few samples), and where no
    neuron holds a sample alone any more, `factorise` looks for the rest by the sparse factorisation of what
    is left (attacks/sparse.py), checked the same way; each sample it finds lets peeling go on. With
    `head_errors` (the classifier's bias gradient, summed over the batch) it also reads the neurons that all
    samples but one fire (attacks/complement.py), the common case in a trained layer."""
    combos = torch.eye(len(grad_b)) if combos is None else combos
    dw, db = grad_w.double() * batch_size, grad_b.double() * batch_size  # sums over the batch
    combos = combos.double()
    floor = SIGNAL_FLOOR * (combos @ db).abs().max().clamp_min(1e-30)
    silent = (db.abs() <= SIGNAL_FLOOR * db.abs().max()) & (
        dw.abs().amax(1) <= SIGNAL_FLOOR * dw.abs().max()
    )  # neurons no sample fired (with two classes, two samples' bias gradients can cancel, their weights' not)
    rounding = rounding_errors(combos, db)
    complement = complement_of(model, dw, db, head_errors)
    known_x, known_y, known_rank = [], [], []
    for _ in range(rounds):
        cand_x, cand_y, error, rows = _check_readouts(
            model, combos, dw, db, floor, silent, rounding, num_classes, input_shape
        )
        neurons = torch.zeros(0, dtype=torch.long)
        if complement is not None:  # no row of combos: read off the complement of neuron `neurons`
            *more, neurons = complement.readouts(dw, db, floor, silent, num_classes, input_shape)
            neurons = neurons[more[2] < 1]
            cand_x, cand_y, error = (torch.cat([a, b]) for a, b in zip((cand_x, cand_y, error), more, strict=True))
        ok = error < 1
        support = torch.cdist(cand_x[ok], cand_x[ok], p=float("inf")) <= 1e-2 * cand_x[ok].abs().amax(1, keepdim=True)
        rank = error[ok] - support.sum(1)  # support first (an integer), mismatch breaks ties
        checked = rows[ok[: len(rows)]]
        terms = complement.in_turn(neurons, db, cand_x[ok], cand_y[ok], input_shape) if len(neurons) else None
        taken = _explained_in_turn(
            model, combos, db, rounding, cand_x[ok], cand_y[ok], checked, rank, input_shape, terms
        )
        new = taken[_distinct(cand_x[ok][taken], torch.cat(known_x) if known_x else None)]
        if len(new):
            new_x, new_y = cand_x[ok][new], cand_y[ok][new]
            known_rank.append(rank[new])
        elif factorise and sum(map(len, known_x)) < batch_size:
            from attacks.sparse import factorised_samples  # here: attacks.sparse builds on this module

            new_x, new_y, mismatch = factorised_samples(
                model, dw, db, batch_size - sum(map(len, known_x)), silent, num_classes, input_shape
            )
            new = _distinct(new_x, torch.cat(known_x) if known_x else None)
            if not len(new):
                break
            new_x, new_y = new_x[new], new_y[new]
            known_rank.append(mismatch[new] - 1)  # one readout each: after the samples read on several neurons
        else:
            break
        g = preactivation_grads(model, new_x.float(), new_y, input_shape).double()
        dw, db = dw - g.T @ new_x, db - g.sum(0)
        rounding = rounding + torch.finfo(torch.float32).eps * (combos.abs() @ g.abs().sum(0))  # what was removed
        if complement is not None:
            complement.remove(new_x, new_y, input_shape)
        known_x.append(new_x)
        known_y.append(new_y)
    rank = torch.cat(known_rank).argsort()[:batch_size] if known_x else torch.zeros(0, dtype=torch.long)
    exact_x = torch.cat(known_x)[rank] if known_x else dw.new_zeros(0, dw.shape[1])
    exact_y = torch.cat(known_y)[rank] if known_y else torch.zeros(0, dtype=torch.long)
    rest = _distinct(cand_x[error.argsort()], exact_x)
    order = error.argsort()[rest]
    total = grad_w.double().norm() * batch_size
    return Readout(
        inputs=torch.cat([exact_x, cand_x[order]]).float(),
        labels=torch.cat([exact_y, cand_y[order]]),
        exact=len(exact_x),
        collisions=len(order),
        unexplained=float(dw.norm() / total.clamp_min(1e-30)),
    )


def complement_of(model: nn.Module, dw: torch.Tensor, db: torch.Tensor, head_errors: torch.Tensor | None):
    """The complement readouts (attacks/complement.py) where the classifier reads this layer directly and
    enough neurons are fired by every sample to give T; else None."""
    if head_errors is None:
        return None
    from attacks.complement import Complement, classifier_after  # here: attacks.complement builds on this module

    head = classifier_after(model)
    complement = Complement(model, head, dw, db, head_errors) if head is not None else None
    return complement if complement is not None and complement.ready else None


def rounding_errors(combos: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """The float32 rounding error to expect in each readout's bias gradient: machine epsilon times the
    absolute gradient mass of the neurons it combines (peeling adds the mass of every sample it subtracts:
    the rounding of the shared sum stays in the residual when the sum is taken apart). A neuron's mass is estimated as the sum of the
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
    error relative to it, up to SLACK_CAP. One scalar per readout can match by chance among thousands, so a candidate that
    would fire a `silent` neuron (one that no sample of the batch fired) is no sample of the batch and gets
    an infinite mismatch."""
    obs_w, obs_b = combos @ dw, combos @ db
    rows = (obs_b.abs() > floor).nonzero().squeeze(1)
    rows = rows[obs_b[rows].abs().argsort(descending=True)]  # best conditioned first
    if not len(rows):
        empty = dw.new_zeros(0)
        return dw.new_zeros(0, dw.shape[1]), empty.long(), empty, empty.long()
    x, observed = obs_w[rows] / obs_b[rows, None], obs_b[rows, None]
    labels = torch.arange(num_classes).repeat(len(rows))
    g = preactivation_grads(model, x.float().repeat_interleave(num_classes, 0), labels, input_shape).double()
    predicted = (g.view(len(rows), num_classes, -1) * combos[rows][:, None, :]).sum(-1)
    error = (predicted - observed).abs() / torch.maximum(predicted.abs(), observed.abs())
    error[firing_silent(model, x, silent)] = math.inf
    error = within_slack(error, CHECK_TOLERANCE + ROUNDING_MARGIN * rounding[rows, None] / observed.abs())
    best = error.min(1)
    return x, best.indices, best.values, rows


def within_slack(error: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """A readout's relative mismatch in units of its tolerance `slack`; infinite (not checked) where the
    tolerance passes SLACK_CAP, so that float32 rounding left from peeling cannot pass a mixture."""
    return torch.where(slack > SLACK_CAP, math.inf, error / slack)


def _explained_in_turn(
    model: nn.Module,
    combos: torch.Tensor,
    db: torch.Tensor,
    rounding: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    rank: torch.Tensor,
    input_shape: tuple[int, ...],
    complement_terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Indices (in `rank` order) of the checked candidates that stay lone samples once those taken before them
    are peeled: each candidate's readout (its row of `combos`; the first len(rows) candidates have one), less
    what the samples already taken put on it, must still pass the single-sample check. A sample read on
    several neurons is taken once, also where its readouts differ: on neurons many samples fired, the float32
    rounding of what was peeled stays in the readout (0.005 to 0.034 off at digits B = 128), yet a second
    readout, once the first is peeled, is left with rounding only. No distance between readouts tells these
    apart from distinct images: faces holds images 0.013 apart. The candidates after the first len(rows) are
    complement readouts (attacks/complement.py), one per neuron, checked the same way on that neuron's
    complement: `complement_terms` gives their observations, tolerances and shares."""
    order = rank.argsort()
    if not len(x):
        return order
    g = preactivation_grads(model, x.float(), labels, input_shape).double()
    share = combos[rows] @ g.T  # share[i, s]: what candidate s would put on candidate i's readout
    observed = combos[rows] @ db
    slack = CHECK_TOLERANCE + ROUNDING_MARGIN * rounding[rows] / observed.abs()
    if complement_terms is not None:
        observed, slack, share = (
            torch.cat(pair) for pair in zip((observed, slack, share), complement_terms, strict=True)
        )
    own = share.diagonal()
    taken = torch.zeros(len(x), dtype=torch.bool)
    for i in order.tolist():
        left = observed[i] - share[i, taken].sum()
        taken[i] = bool((left - own[i]).abs() < slack[i] * torch.maximum(own[i].abs(), left.abs()))
    return order[taken[order]]


def firing_silent(model: nn.Module, x: torch.Tensor, silent: torch.Tensor) -> torch.Tensor:
    """Which candidates x (readout-layer inputs) clearly fire a `silent` neuron, one no sample of the batch
    fired: their pre-activation there is above 0 by more than FIRING_MARGIN of its scale, so that a real
    sample lying within rounding of a neuron's threshold is not rejected. Only for a layer followed by a
    ReLU: a classifier read directly (LeNet) has no silent neurons to speak of, and is left unchecked."""
    layer = readout_layer(model)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    z = x.double() @ w.T + b
    scale = x.double().abs() @ w.abs().T + b.abs()
    return ((z > FIRING_MARGIN * scale) & silent).any(-1)


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


def readout_rows(readout: Readout, count: int, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` readouts (exact ones first) and their labels; where there are too few, `fill`
    (or the mean readout) stands in for the missing rows."""
    n = min(count, len(readout.inputs))
    rows = torch.full((count, readout.inputs.shape[1]), 0.0 if fill is None else fill)
    if fill is None and n:
        rows[:] = readout.inputs[:n].mean(0)
    labels = torch.zeros(count, dtype=torch.long)
    rows[:n], labels[:n] = readout.inputs[:n], readout.labels[:n]
    return rows, labels


def readout_images(readout: Readout, count: int, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images in [0, 1] from a pixel-space readout, exact ones first; mid-grey where it has too few."""
    rows, labels = readout_rows(readout, count, fill=0.5)
    return rows.view(count, *input_shape).clamp(0, 1), labels


def reads_pixels(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the readout layer reads the flattened image (fcnn, imprint) rather than features (cnn, backbone)."""
    probe = torch.rand(1, *input_shape, generator=torch.Generator().manual_seed(0))
    inputs = layer_inputs(model, probe)
    return inputs.shape == probe.flatten(1).shape and torch.equal(inputs, probe.flatten(1))


def read_update(
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    combos: torch.Tensor | None = None,
    rounds: int = PEEL_ROUNDS,
    factorise: bool = False,
) -> Readout:
    """read_layer on the readout layer of `model` for an update; under secure aggregation the update sums
    several clients' mean gradients, read as one larger batch."""
    grad_w, grad_b = readout_gradients(model, update)
    scale = 1.0 / update.num_clients
    batch = update.batch_size * update.num_clients
    errors = last_layer_gradients(model, update.gradients).double() * scale * batch if factorise else None
    return read_layer(
        model, grad_w * scale, grad_b * scale, batch, num_classes, input_shape, combos, rounds, factorise, errors
    )


def on_cpu(model: nn.Module, update: SharedUpdate) -> tuple[nn.Module, SharedUpdate]:
    """CPU copies of the model and the update: the readouts are a few small matrix products with float64
    sums, which a GPU would only slow down."""
    gradients = tuple(g.cpu() for g in update.gradients)
    return copy.deepcopy(model).cpu(), dataclasses.replace(update, gradients=gradients)
