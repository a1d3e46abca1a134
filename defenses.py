"""The client side of the threat model: what a client shares after its local work on its private samples,
one local step (gradient mode) or a FedAvg client's epochs of local SGD.

`client_update` (with `local_training`, the local SGD loop it runs) is the only code here that touches the
private images; what it returns, a `SharedUpdate`, is all an attack (attacks/) ever sees. Every mechanism is
one entry of MECHANISMS (how each step's gradient is computed, what is done to the finished update), named
on the command line as `name[:strength]` (sweeps: `name:a,b,c`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from privacy import PRV_MAX_EPSILON, WeightNoiseRegularizer
from utils import UsageError

Grads = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class SharedUpdate:
    """What the server receives: gradients (one per trainable parameter, in model.parameters() order) and
    the protocol metadata a server knows. Never the private batch.

    The protocol is public: which mechanism the clients apply and its settings (the spec's strength, the
    DP-SGD clip norm and noise multiplier, the regularized loss's penalty weight), so an adaptive attacker
    can model the mechanism (attacks/matching.py). The noise itself is private.

    A multi-step (FedAvg) update is carried in the same field: `gradients` then holds (sent weights -
    returned weights) / lr, the sum of the client's `local_steps` SGD steps over `local_epochs` epochs of its
    `num_samples` samples in batches of `batch_size`; with one local step it is exactly the gradient."""

    gradients: Grads
    batch_size: int  # samples per client and local step
    lr: float
    local_steps: int = 1  # > 1: a FedAvg weight update, see below
    local_epochs: int = 1
    num_samples: int | None = None  # samples the client holds; None: one batch (gradient mode)
    num_clients: int = 1  # > 1 under secure aggregation: `gradients` is the sum of this many clients' updates
    mechanism: str = "none"  # the spec, name[:strength]
    max_grad_norm: float | None = None  # dp-sgd: the per-sample clip norm C; dp-fedavg: the weight update's
    noise_multiplier: float | None = None  # dp-sgd: z, noise std z * C on the summed clipped gradients (dp-fedavg:
    # on the clipped weight update)
    kappa: float = 0.0  # regularized: the penalty weight (lr * reg_sigma)^2

    @property
    def mechanism_name(self) -> str:
        return self.mechanism.partition(":")[0]

    @property
    def strength(self) -> float | None:
        value = self.mechanism.partition(":")[2]
        return float(value) if value else None


@dataclass(frozen=True)
class ClientSetup:
    """The training set-up a client follows, which fixes DP-SGD's noise and the regularized loss."""

    max_grad_norm: float = 1.0  # DP-SGD per-sample clipping bound C
    noise_multiplier: float = 0.0  # z; noise std on the summed gradient is z * C
    lr: float = 0.05
    kappa: float = 0.0  # weight of the PDP-SGD penalty, (lr * reg_sigma)^2
    seed: int = 0


@dataclass(frozen=True)
class MechanismSpec:
    """One parsed `name[:strength]`; `spec` is the canonical string used in run names and tables."""

    name: str
    strength: float | None

    @property
    def spec(self) -> str:
        return self.name if self.strength is None else f"{self.name}:{self.strength:g}"


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def batch_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> Grads:
    """Gradient of the mean cross-entropy of one batch: the undefended update."""
    loss = F.cross_entropy(model(images), labels)
    return tuple(g.detach() for g in torch.autograd.grad(loss, trainable_parameters(model)))


# --- gradient transforms (strength validated by parse_mechanisms) ------------------------------------


def prune(grads: Grads, fraction: float) -> Grads:
    """Zero the `fraction` of smallest-magnitude entries of each tensor (Zhu et al.'s pruning defense)."""
    out = []
    for g in grads:
        k = int(fraction * g.numel())
        flat = g.flatten().clone()
        if k > 0:
            flat[flat.abs().argsort()[:k]] = 0
        out.append(flat.view_as(g))
    return tuple(out)


def top_k(grads: Grads, fraction: float) -> Grads:
    """Keep the `fraction` of largest-magnitude entries of each tensor (at least one), zero the rest."""
    out = []
    for g in grads:
        keep = g.abs().flatten().topk(max(1, math.ceil(fraction * g.numel()))).indices
        flat = torch.zeros_like(g).flatten()
        flat[keep] = g.flatten()[keep]
        out.append(flat.view_as(g))
    return tuple(out)


def quantize(grads: Grads, bits: float) -> Grads:
    """Uniform quantization of each tensor to 2^bits levels spanning its own [min, max]."""
    levels = 2 ** int(bits) - 1
    out = []
    for g in grads:
        lo, hi = g.min(), g.max()
        scale = (hi - lo).clamp_min(torch.finfo(g.dtype).tiny) / levels
        out.append(lo + torch.round((g - lo) / scale) * scale)
    return tuple(out)


def add_noise(grads: Grads, sigma: float, generator: torch.Generator) -> Grads:
    """Additive Gaussian noise N(0, sigma^2) on every entry (no clipping, so no ε)."""
    return tuple(g + sigma * _randn_like(g, generator) for g in grads)


def _randn_like(g: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)


# --- mechanisms: model + private batch -> shared gradients ----------------------------------------


def dp_sgd_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup, generator: torch.Generator
) -> Grads:
    """One DP-SGD step as Opacus takes it: per-sample gradients (torch.func), each clipped to total norm
    max_grad_norm with Opacus' factor min(1, C / (norm + 1e-6)), summed, Gaussian noise of std z * C
    added to the sum, divided by the batch size, so the averaged gradient carries noise std z * C / B."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**p, **frozen, **buffers}, (x[None],))
        return F.cross_entropy(out, y[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, images, labels)
    flat = [per_sample[n].flatten(1) for n in names]
    norms = torch.cat(flat, dim=1).norm(dim=1)
    factor = (setup.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    std = setup.noise_multiplier * setup.max_grad_norm
    summed = [torch.einsum("b,b...->...", factor, per_sample[n]) for n in names]
    return tuple((s + std * _randn_like(s, generator)) / len(images) for s in summed)


def regularized_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, kappa: float) -> Grads:
    """Gradient of cross-entropy plus the PDP-SGD weight-noise penalty, as the training study trains."""
    reg = WeightNoiseRegularizer(model, kappa)
    try:
        loss = F.cross_entropy(model(images), labels) + reg.penalty()
    finally:
        reg.remove()
    return tuple(g.detach() for g in torch.autograd.grad(loss, trainable_parameters(model)))


def dp_fedavg(grads: Grads, noise_multiplier: float, setup: ClientSetup, generator: torch.Generator) -> Grads:
    """Client-level DP (DP-FedAvg, McMahan et al. 2018, as Flower's fixed-clipping wrappers do it): the
    client's weight update lr * sum(g) clipped to total norm C = max_grad_norm, Gaussian noise of std z * C
    added, returned in gradient units. It is the release of a round the victim is alone in: with more
    clients the same noise covers their sum, so this is the most an attacker can see of one client."""
    delta = [setup.lr * g for g in grads]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in delta))
    factor = (setup.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * setup.max_grad_norm
    return tuple((factor * d + std * _randn_like(d, generator)) / setup.lr for d in delta)


@dataclass(frozen=True)
class Mechanism:
    """One mechanism: how the client computes each local step's gradient (`step`), what it does to its
    finished update before sharing it (`share`), and how its strength is checked. In gradient mode the
    update is one step; a FedAvg client shares the sum of its local steps (local_training)."""

    step: Callable[..., Grads]  # (model, images, labels, setup, generator) -> one step's gradient
    share: Callable[..., Grads] | None  # (gradients, strength, setup, generator) -> what is shared
    default: float | None  # strength when the spec names none
    check: Callable[[float], bool] | None  # None: the mechanism takes no strength
    allowed: str  # the valid range, for error messages


def _plain(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, setup: ClientSetup, generator) -> Grads:
    return batch_gradients(model, images, labels)


def _transform(fn: Callable[..., Grads], with_generator: bool = False) -> Callable[..., Grads]:
    def share(grads, strength, setup, generator) -> Grads:
        return fn(grads, strength, generator) if with_generator else fn(grads, strength)

    return share


def _is_int(value: float) -> bool:
    return float(value).is_integer()


MECHANISMS: dict[str, Mechanism] = {
    "none": Mechanism(_plain, None, None, None, "no strength"),
    "dp-sgd": Mechanism(
        lambda m, x, y, setup, gen: dp_sgd_gradients(m, x, y, setup, gen),
        None,
        None,
        lambda v: 0 < v <= PRV_MAX_EPSILON,
        f"ε in (0, {PRV_MAX_EPSILON:g}] (above it the guarantee is vacuous and the prv accountant's noise search breaks down)",
    ),
    "regularized": Mechanism(
        lambda m, x, y, setup, gen: regularized_gradients(m, x, y, setup.kappa), None, None, None, "no strength"
    ),
    "prune": Mechanism(_plain, _transform(prune), 0.2, lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
    "quantize": Mechanism(
        _plain, _transform(quantize), 4, lambda v: 1 <= v <= 32 and _is_int(v), "an integer number of bits in [1, 32]"
    ),
    "noise": Mechanism(_plain, _transform(add_noise, with_generator=True), 0.01, lambda v: v >= 0, "a std sigma >= 0"),
    "topk": Mechanism(_plain, _transform(top_k), 0.1, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    "secagg": Mechanism(_plain, None, 10, lambda v: v >= 2 and _is_int(v), "an integer number of clients >= 2"),
    "dp-fedavg": Mechanism(
        _plain, dp_fedavg, 1.0, lambda v: v >= 0, "a noise multiplier z >= 0 (noise std z * C on the clipped update)"
    ),
}


def parse_mechanisms(specs: list[str]) -> list[MechanismSpec]:
    """Parse `name[:strength]` specs, expanding sweeps `name:a,b,c` into one spec per strength, and check
    every strength against its mechanism's range (UsageError naming the bad value otherwise)."""
    if not specs:
        raise UsageError("--mechanisms is empty; name at least one, e.g. none or dp-sgd:8.")
    parsed: list[MechanismSpec] = []
    for spec in specs:
        name, _, strengths = spec.partition(":")
        if name not in MECHANISMS:
            raise UsageError(
                f"unknown mechanism '{name}' in '{spec}'; choose from {', '.join(MECHANISMS)} "
                "(spec name[:strength], e.g. prune:0.2 or a sweep noise:1e-3,1e-2)."
            )
        mech = MECHANISMS[name]
        if spec.endswith(":"):
            raise UsageError(
                f"'{spec}' ends in ':' with no strength; write {name}:VALUE ({mech.allowed}) or just '{name}'."
            )
        if not strengths:
            parsed.append(MechanismSpec(name, None if mech.default is None else float(mech.default)))
            continue
        if mech.check is None:
            raise UsageError(f"mechanism '{name}' takes no strength, but '{spec}' gives one; write just '{name}'.")
        for text in strengths.split(","):
            try:
                value = float(text)
            except ValueError:
                raise UsageError(
                    f"strength '{text}' in '{spec}' is not a number; {name} takes {mech.allowed}."
                ) from None
            if not math.isfinite(value) or not mech.check(value):
                raise UsageError(f"strength {text} in '{spec}' is out of range; {name} takes {mech.allowed}.")
            parsed.append(MechanismSpec(name, value))
    return list(dict.fromkeys(parsed))  # drop repeats, keep order


def local_training(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    step: Callable[..., Grads],
    setup: ClientSetup,
    generator: torch.Generator,
    epochs: int = 1,
    batch_size: int | None = None,
) -> Grads:
    """The client's local work: `epochs` passes of plain SGD (learning rate setup.lr) over its samples,
    reshuffled every epoch (the order stays private), in batches of `batch_size` (the last one smaller if
    it does not divide), each step's gradient computed by `step`. Returns (sent weights - returned weights) /
    lr computed from the weights themselves, as the server of a FedAvg round computes it from the float32
    weights it receives: the sum of the step gradients up to the rounding of every step's weights, which an
    attack must live with (a separately accumulated sum would hand it precision no server has). One step (the
    default) is exactly that step's gradient and leaves the model untouched. Trains a copy: the sent model
    stays as it was."""
    batch_size = batch_size or len(images)
    if epochs == 1 and batch_size >= len(images):
        return step(model, images, labels, setup, generator)
    local = copy.deepcopy(model)
    params = trainable_parameters(local)
    sent = [p.detach().clone() for p in params]
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        for batch in order.split(batch_size):
            grads = step(local, images[batch], labels[batch], setup, generator)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p -= setup.lr * g
    return tuple((s - p.detach()) / setup.lr for s, p in zip(sent, params, strict=True))


def client_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mechanism: MechanismSpec,
    setup: ClientSetup,
    others: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    epochs: int = 1,
    batch_size: int | None = None,
) -> SharedUpdate:
    """What the client shares after its local work on its private samples under `mechanism`: by default one
    step on them as one batch (gradient mode); with `epochs` and `batch_size`, a FedAvg client's weight
    update (local_training). `others` are the other clients' samples, used only by secure aggregation (N-1
    of them, each training the same way): the server then sees the sum of all the clients' updates."""
    mech = MECHANISMS[mechanism.name]
    clients = int(mechanism.strength) if mechanism.name == "secagg" else 1
    others = others or []
    if len(others) != clients - 1:
        raise ValueError(f"{mechanism.spec} needs {clients - 1} other clients' batches, got {len(others)}")
    generator = torch.Generator().manual_seed(setup.seed)
    batch_size = min(batch_size or len(images), len(images))
    grads = [torch.zeros_like(p) for p in trainable_parameters(model)]
    for x, y in [(images, labels), *others]:
        local = local_training(model, x, y, mech.step, setup, generator, epochs, batch_size)
        grads = [t + g for t, g in zip(grads, local, strict=True)]
    if mech.share:
        grads = mech.share(tuple(grads), mechanism.strength, setup, generator)
    clipped = mechanism.name in ("dp-sgd", "dp-fedavg")
    return SharedUpdate(
        gradients=tuple(g.detach() for g in grads),
        batch_size=batch_size,
        lr=setup.lr,
        local_steps=epochs * math.ceil(len(images) / batch_size),
        local_epochs=epochs,
        num_samples=None if batch_size == len(images) and epochs == 1 else len(images),
        num_clients=clients,
        mechanism=mechanism.spec,
        max_grad_norm=setup.max_grad_norm if clipped else None,
        noise_multiplier=(setup.noise_multiplier if mechanism.name == "dp-sgd" else mechanism.strength)
        if clipped
        else None,
        kappa=setup.kappa if mechanism.name == "regularized" else 0.0,
    )
