"""What a gradient-matching attacker compares: the gradient that candidate images and labels would give, passed
through the mechanism the protocol publicly uses, against the shared one.

An adaptive attacker models the defense it knows (DESIGN.md): under `regularized` it differentiates the client's
regularized loss (penalty weight kappa); under `dp-sgd` it clips each candidate's per-sample gradient at the
clip norm C, as the client did (the noise is the one thing it cannot know; a squared distance is its maximum-
likelihood match); under `prune` and `topk` it compares only the entries that were shared; under `quantize` it
counts only how far a candidate's gradient falls outside the quantization bin of the shared value; under
`secagg:N` it reconstructs the N * B samples behind the sum (attacks.num_reconstructed). A non-adaptive attacker
matches the plain gradient of the plain loss, whatever the client did.

Every function here works on a batch of R independent candidates (restarts): images (R, N, *input_shape) and
gradients with a leading R, so restarts run as one batched computation (torch.func.vmap) instead of a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from defenses import SharedUpdate
from privacy import WeightNoiseRegularizer

Grads = tuple[torch.Tensor, ...]
IN_BIN_PULL = 0.1  # quantize: weight of the distance to the bin's centre while a candidate is inside the bin.
# The bin alone leaves a wide set of consistent candidates (L-BFGS stopped at once, 15 dB at 4 bits on LeNet);
# a weak pull to the centre breaks the tie: 18 dB, against 17 dB for the plain distance (8 vs 5 dB at 2 bits)


def target_gradients(update: SharedUpdate) -> Grads:
    """The shared gradients as a mean over all the samples behind them (a sum of N clients' means is N times
    the mean over all N*B samples), so an attack can match them with one batch's mean-loss gradient."""
    return tuple(g / update.num_clients for g in update.gradients)


@contextmanager
def client_gradient(
    model: nn.Module, update: SharedUpdate, adaptive: bool = True
) -> Iterator[Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]]:
    """The gradient one candidate batch (images, targets: class indices or probabilities) gives at trainable
    parameters p (a dict by name), as the client computes it under the update's mechanism (adaptive) or plainly:
    `fn(p, images, targets) -> {name: gradient}`, differentiable with respect to all three (a FedAvg attack
    steps p with it through the client's local training)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed |= dict(model.named_buffers())
    kappa = update.kappa if adaptive and update.mechanism_name == "regularized" else 0.0
    clip = update.max_grad_norm if adaptive and update.mechanism_name == "dp-sgd" else None
    regularizer = WeightNoiseRegularizer(model, kappa) if kappa else None

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        value = F.cross_entropy(functional_call(model, {**p, **fixed}, (x,)), t)
        return value + regularizer.penalty() if regularizer else value

    def clipped_mean(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """DP-SGD's per-sample clipping, Opacus' factor min(1, C / (norm + 1e-6)), then the batch mean."""
        if len(x) == 1:  # one sample: its gradient is the batch's, no per-sample machinery needed
            per_sample = {n: g[None] for n, g in grad(loss)(p, x, t).items()}
        else:
            per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(p, x[:, None], t[:, None])
        norms = torch.cat([per_sample[n].flatten(1) for n in names], 1).norm(dim=1)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        return {n: torch.einsum("b,b...->...", factor, per_sample[n]) / len(x) for n in names}

    try:
        yield grad(loss) if clip is None else clipped_mean
    finally:
        if regularizer:
            regularizer.remove()


def candidate_gradients(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, update: SharedUpdate, adaptive: bool = True
) -> Grads:
    """For each of R candidates, the gradient its N images and targets (class indices (R, N) or probabilities
    (R, N, C)) would give the client's trainable parameters, as the client computes it under the update's
    mechanism (adaptive) or plainly; differentiable with respect to the images and targets. Returns one
    (R, *parameter shape) tensor per trainable parameter, in parameter order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    with client_gradient(model, update, adaptive) as per_candidate:
        if len(images) == 1:  # one candidate: no vmap, which costs more than it saves for a single one
            grads = {n: g[None] for n, g in per_candidate(params, images[0], targets[0]).items()}
        else:
            grads = vmap(per_candidate, in_dims=(None, 0, 0))(params, images, targets)
    return tuple(grads[n] for n in names)


def as_shared(candidate: Grads, target: Grads, update: SharedUpdate, adaptive: bool = True) -> Grads:
    """A candidate's gradients (leading R) as the mechanism would have let them through, in what the server
    can compare with the shared ones: masked to the shared entries (prune, topk), or, for quantize, the
    shared value plus how far the candidate falls outside its quantization bin (and IN_BIN_PULL of its
    offset from the bin's centre)."""
    name = update.mechanism_name
    if not adaptive or name not in ("prune", "topk", "quantize"):
        return candidate
    if name != "quantize":
        return tuple(c * (t != 0) for c, t in zip(candidate, target, strict=True))
    levels = 2 ** int(update.strength) - 1
    out = []
    for c, t in zip(candidate, target, strict=True):
        half_bin = (t.max() - t.min()) / levels / 2
        excess = (c - t).abs() - half_bin
        out.append(t + torch.sign(c - t) * excess.clamp_min(0) + IN_BIN_PULL * (c - t))
    return tuple(out)


def gradient_distances(candidate: Grads, target: Grads, kind: str) -> torch.Tensor:
    """One distance per candidate (leading R) to the shared gradients. 'l2': summed squared difference (DLG);
    'cosine': 1 - cosine similarity of the concatenated gradients (Inverting Gradients), which ignores the
    scale that the defenses, DP clipping and an unknown batch size distort."""
    if kind == "l2":
        return sum(((c - t) ** 2).flatten(1).sum(1) for c, t in zip(candidate, target, strict=True))
    if kind == "cosine":
        # Each side is first divided by its largest entry: a confident model's gradients can be so small that
        # their squares underflow float32, and the cosine does not depend on the scale.
        tiny = torch.finfo(target[0].dtype).tiny
        target_scale = torch.stack([t.abs().max() for t in target]).max().clamp_min(tiny)
        target = [t / target_scale for t in target]
        scale = torch.stack([c.abs().flatten(1).amax(1) for c in candidate]).amax(0).clamp_min(tiny)
        candidate = [c / scale.view(-1, *[1] * (c.dim() - 1)) for c in candidate]
        dot = sum((c * t).flatten(1).sum(1) for c, t in zip(candidate, target, strict=True))
        norm_c = torch.sqrt(sum(c.pow(2).flatten(1).sum(1) for c in candidate))
        norm_t = torch.sqrt(sum(t.pow(2).sum() for t in target))
        return 1 - dot / (norm_c * norm_t).clamp_min(tiny)
    raise ValueError(f"unknown gradient distance {kind!r}")


def matching_losses(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    update: SharedUpdate,
    kind: str,
    adaptive: bool = True,
) -> torch.Tensor:
    """How far each of R candidate batches is from explaining the shared update: candidate_gradients, seen
    through the mechanism (as_shared), against the shared gradients. Differentiable; shape (R,)."""
    device = images.device
    target = tuple(g.to(device) for g in target_gradients(update))
    candidate = candidate_gradients(model, images, targets, update, adaptive)
    return gradient_distances(as_shared(candidate, target, update, adaptive), target, kind)


def matching_score(model: nn.Module, update: SharedUpdate, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The one measure by which `--attacks auto` ranks every attack's reconstruction of a batch: the adaptive
    cosine matching loss of the images with their labels (0: they explain the shared update exactly). It
    uses only what the server has; the evaluation never enters."""
    device = next(model.parameters()).device
    images, labels = images.to(device)[None], labels.to(device)[None]
    return float(matching_losses(model, images, labels, update, "cosine").detach())
