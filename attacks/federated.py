"""Attacks on FedAvg updates: the client ran several local SGD steps and shared (sent - returned weights) / lr.

- `ig-weight` treats the update as one scaled gradient of all the client's samples (its mean step) and runs
  Inverting Gradients on it (attacks/optimization.py): the baseline that ignores the local training.
- `ig-multi` (Geiping et al. 2020, section 6) simulates the client's local training on dummy data, one
  differentiable unrolled SGD run, and matches the simulated update to the shared one by cosine, with the
  total-variation prior.
- `dlf` (Dimitrov et al. 2022, Data Leakage in Federated Averaging) keeps one set of dummy images per epoch
  (each epoch sees the client's images in another order, so each epoch's set may settle on its own), ties the
  sets together with the epoch-order prior (the distance of every epoch's copy of a sample to their mean) and
  answers with the mean.
Both simulations use the label counts read off the update (label_counts, DLF's estimate at interpolated
weights), and on an MLP search the images in the span of the first layer's update (input_span), which holds
every sample whatever the number of local steps, under DLF's clip prior.

They model what the server knows of the protocol (adaptive, as attacks/matching.py does for one gradient):
the number of epochs and batches, the learning rate, DP-SGD's per-sample clipping in every step, the
mechanism's effect on the shared update (matching.as_shared), and under secure aggregation the sum over the
round's clients, each training on its own samples. The client's shuffling is private: the simulation draws its
own orders, which matter only through the weight drift within an epoch.

`dmgan` (Hitaj et al. 2017, Deep Models Under the GAN) is a malicious client, not a server: GanAttacker and
dmgan_update give its turn in each FedAvg round (usable by a federation or a simulated one, as the benchmark
does); it produces images of a class it does not hold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from attacks import Attack, Observer, Reconstruction, Trajectory, best_of_restarts, total_variation
from attacks.labels import last_layer_gradients, mean_prediction
from attacks.matching import as_shared, client_gradient, gradient_distances
from attacks.optimization import RECIPES, invert
from defenses import ClientSetup, Grads, MechanismSpec, SharedUpdate, client_update, trainable_parameters

if TYPE_CHECKING:
    from config import AttackConfig


def num_local_samples(update: SharedUpdate) -> int:
    """Samples each client trained on: num_samples for a FedAvg update, the batch in gradient mode."""
    return update.num_samples or update.batch_size


def as_gradient(update: SharedUpdate) -> SharedUpdate:
    """The update read as one gradient of the mean loss over all the client's samples: the mean step (at
    small learning rates each sample enters the sum of steps once per epoch, so the sum over local_steps
    steps is local_steps times about that gradient). One local step is returned unchanged."""
    if update.local_steps == 1:
        return update
    steps = update.local_steps
    return replace(
        update,
        gradients=tuple(g / steps for g in update.gradients),
        batch_size=num_local_samples(update),
        local_steps=1,
        local_epochs=1,
        num_samples=None,
    )


# --- labels --------------------------------------------------------------------------------------------------


def label_counts(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """How many of the client's samples carry each label, read off the update (DLF's label recovery).

    Each step's bias gradient of the last layer is g_t = p̄_t - n_t / B (p̄_t the mean prediction at that
    step's weights, n_t the step's label counts), and over the local training every sample is seen once per
    epoch, so the shared sum G = sum_t g_t gives n = B (sum_t p̄_t - G) / E. The weights of step t are unknown;
    DLF interpolates them between the sent weights and the returned ones (sent - lr * G), and p̄_t is the
    model's mean prediction there (labels.mean_prediction). Under secure aggregation G sums the clients'
    updates, each taken over the same trajectory. Rounded to whole counts that add up to the samples."""
    clients, steps, total = update.num_clients, update.local_steps, num_local_samples(update) * update.num_clients
    signal = last_layer_gradients(model, update.gradients).detach().cpu().double()
    sent = [p.detach() for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    predicted = torch.zeros_like(signal)
    for t in range(steps):
        fraction = t / steps
        weights = {
            n: s - fraction * update.lr * g / clients for n, s, g in zip(names, sent, update.gradients, strict=True)
        }
        with _weights(model, weights):
            predicted += mean_prediction(model, input_shape, seed=seed).cpu().double()
    estimate = update.batch_size * (clients * predicted - signal) / update.local_epochs
    return _whole_counts(estimate.clamp_min(0), total)


class _weights:
    """Temporarily load `weights` (by parameter name) into the model."""

    def __init__(self, model: nn.Module, weights: dict[str, torch.Tensor]):
        self.model, self.weights = model, weights

    def __enter__(self) -> None:
        params = dict(self.model.named_parameters())
        self.saved = {n: params[n].detach().clone() for n in self.weights}
        with torch.no_grad():
            for n, w in self.weights.items():
                params[n].copy_(w)

    def __exit__(self, *exc) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, w in self.saved.items():
                params[n].copy_(w)


def _whole_counts(estimate: torch.Tensor, total: int) -> torch.Tensor:
    """Integer counts adding up to `total` closest to a real-valued estimate (largest remainders)."""
    scaled = estimate * total / estimate.sum().clamp_min(1e-12)
    counts = scaled.floor().long()
    for c in torch.argsort(scaled - counts, descending=True)[: total - int(counts.sum())]:
        counts[c] += 1
    return counts


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


# --- the client's local training, simulated on dummy data ------------------------------------------------------


def epoch_orders(update: SharedUpdate, seed: int) -> torch.Tensor:
    """The simulation's own shuffling: one permutation of each client's samples per epoch (local_epochs, n)."""
    generator = torch.Generator().manual_seed(seed)
    n = num_local_samples(update)
    return torch.stack([torch.randperm(n, generator=generator) for _ in range(update.local_epochs)])


def simulated_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    update: SharedUpdate,
    orders: torch.Tensor,
    adaptive: bool = True,
) -> Grads:
    """The update the client would have shared had it held these samples: images (V, n * clients,
    *input_shape), one set per epoch (V = local_epochs) or one for all (V = 1), labels (n * clients,). Every
    client runs the local training on its n samples (epoch e in the order orders[e], batches of
    update.batch_size, learning rate update.lr) and the updates are summed over the clients. Each step's
    gradient is the one the client computes: under a mechanism the attacker models (DP-SGD's per-sample
    clipping, the regularized loss) matching.client_gradient's, else the plain batch gradient, taken with
    autograd (create_graph), which unrolls several times faster than torch.func.grad on small models.
    Differentiable in the images; one tensor per trainable parameter."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    start = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad} | dict(model.named_buffers())
    n, size = num_local_samples(update), update.batch_size
    modelled = adaptive and update.mechanism_name in ("dp-sgd", "regularized")

    def plain_gradient(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(functional_call(model, {**params, **fixed}, (x,)), y)
        return dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names], create_graph=True), strict=True))

    total = {k: torch.zeros_like(v) for k, v in start.items()}
    with client_gradient(model, update, adaptive) as modelled_gradient:
        step_gradient = modelled_gradient if modelled else plain_gradient
        for client in range(update.num_clients):
            params, own = start, slice(client * n, (client + 1) * n)
            for epoch in range(update.local_epochs):
                data = images[min(epoch, len(images) - 1), own]
                for batch in orders[epoch].split(size):
                    grads = step_gradient(params, data[batch], labels[own][batch])
                    params = {k: params[k] - update.lr * grads[k] for k in names}
                    total = {k: total[k] + grads[k] for k in names}
    return tuple(total[k] for k in names)


# --- the attacks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalRecipe:
    per_epoch: bool  # dlf: one set of dummy images per epoch, tied by the epoch-order prior
    lr: float = 0.1  # signed Adam on pixels (Inverting Gradients' rate)
    span_lr: float = 0.3  # plain Adam on the coefficients in the input span (1 step, 5 digits: 28 dB, 23.7 signed)
    tv_weight: float = 1e-2
    order_weight: float = 0.0  # weight of the epoch-order prior (dlf)
    adaptive: bool = True
    span: bool = True  # search the images in the span of the first layer's update where it is a dense layer


BOX_WEIGHT = 10.0  # weight of the clip prior on pixels outside [0, 1] when the images live in the input span


def input_span(model: nn.Module, update: SharedUpdate, input_shape: tuple[int, ...], count: int) -> torch.Tensor | None:
    """Where the first layer is a dense layer on the pixels (an MLP): an orthonormal basis (count, pixels) of
    the span of its update's rows, which holds every sample the client trained on. Each local step adds
    sum_i delta_i x_i^T to that layer's weight, so however many steps the client took, its update is D X for
    the samples X (n, pixels): its top `count` right singular vectors span them (exactly without noise, the
    least-squares span with it). None where the first layer is not dense on the pixels or is narrower than
    the samples (then the span does not pin them down)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    pixels = math.prod(input_shape)
    if not isinstance(first, nn.Linear) or first.in_features != pixels or not first.weight.requires_grad:
        return None
    weight = update.gradients[[id(p) for p in trainable_parameters(model)].index(id(first.weight))]
    if weight.shape[0] < count:
        return None
    return torch.linalg.svd(weight.detach().double(), full_matrices=False)[2][:count].float()


def epoch_order_prior(images: torch.Tensor) -> torch.Tensor:
    """DLF's epoch-order-invariant prior for each candidate (R, V, N, ...): the mean squared distance of every
    epoch's copy of a sample to the copies' mean (0 when all epochs agree)."""
    return (images - images.mean(1, keepdim=True)).pow(2).flatten(1).mean(1)


def invert_local(
    recipe: LocalRecipe,
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """Reconstruct every sample behind a FedAvg update by simulating the client's local training on dummy
    images with the estimated labels and matching the simulated update (cosine, TV, and for dlf the epoch-order
    prior; signed Adam with step decay inside the box [0, 1], as Inverting Gradients). The restarts run as one
    batched optimisation; the best match is kept."""
    device = next(model.parameters()).device
    count = num_local_samples(update) * update.num_clients
    labels = counts_to_labels(label_counts(model, update, input_shape, cfg.seed)).to(device)
    views = update.local_epochs if recipe.per_epoch else 1
    orders = epoch_orders(update, cfg.seed)
    starts = [torch.Generator().manual_seed(cfg.seed * 1000 + r) for r in range(cfg.restarts)]
    draws = torch.stack([torch.rand((1, count, *input_shape), generator=g) for g in starts]).to(device)
    draws = draws.expand(-1, views, *[-1] * (draws.dim() - 2))
    basis = input_span(model, update, input_shape, count) if recipe.span else None
    if basis is None:  # the pixels themselves
        variables = draws.clone().requires_grad_()
        pixels = lambda: variables
    else:  # coefficients in the span; the pixels they give (before the box) are the images
        basis = basis.to(device)
        variables = (draws.flatten(3) @ basis.T).requires_grad_()
        pixels = lambda: (variables @ basis).view(*draws.shape)
    target = tuple(g.to(device) for g in update.gradients)

    def objective() -> torch.Tensor:
        images = pixels()
        simulated = [simulated_update(model, x, labels, update, orders, recipe.adaptive) for x in images]
        candidate = tuple(torch.stack(g) for g in zip(*simulated, strict=True))
        shared = as_shared(candidate, target, update, recipe.adaptive)
        losses = gradient_distances(shared, target, "cosine")
        losses = losses + recipe.tv_weight * torch.stack([total_variation(x.flatten(0, 1)) for x in images])
        if basis is not None:  # DLF's clip prior: the span holds pixels outside [0, 1], the client does not
            losses = losses + BOX_WEIGHT * (images - images.clamp(0, 1)).pow(2).flatten(1).mean(1)
        if recipe.order_weight and views > 1:
            losses = losses + recipe.order_weight * epoch_order_prior(images)
        return losses

    optimizer = torch.optim.Adam([variables], lr=recipe.lr if basis is None else recipe.span_lr)
    milestones = [int(cfg.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    trajectories = [Trajectory(cfg.iterations, cfg.log_every) for _ in range(cfg.restarts)]
    final = labels.cpu()

    def log(iteration: int, losses: torch.Tensor) -> None:
        images = pixels().detach()
        for r, trajectory in enumerate(trajectories):
            trajectory.log(iteration, images[r].mean(0), final, float(losses[r]))

    for iteration in range(cfg.iterations + 1):
        optimizer.zero_grad()
        losses = objective()
        if iteration in trajectories[0].points:
            log(iteration, losses.detach().cpu())
            if not torch.isfinite(losses).any():
                break
        if iteration == cfg.iterations:
            break
        losses.sum().backward()
        if basis is None:  # pixels: IG's signed steps; the span's few coefficients converge better unsigned
            variables.grad.sign_()
        optimizer.step()
        scheduler.step()
        if basis is None:
            with torch.no_grad():
                variables.clamp_(0, 1)
    images = pixels().detach().clamp(0, 1)
    results = [
        (Reconstruction(images[r].mean(0), final, float(losses[r].detach())), trajectories[r])
        for r in range(cfg.restarts)
    ]
    return best_of_restarts(results, observe)


def invert_weight_update(model, update, input_shape, num_classes, cfg, observe) -> Reconstruction:
    """ig-weight: Inverting Gradients on the update read as one gradient of all the client's samples."""
    return invert(RECIPES["ig"], model, as_gradient(update), input_shape, num_classes, cfg, observe)


ATTACKS = {
    "ig-weight": Attack(
        invert_weight_update, 1000, description="IG on a FedAvg update read as one gradient (the baseline)"
    ),
    "ig-multi": Attack(
        partial(invert_local, LocalRecipe(per_epoch=False)),
        200,
        description="IG simulating the client's local steps on dummy data (Geiping et al. 2020)",
    ),
    "dlf": Attack(
        partial(invert_local, LocalRecipe(per_epoch=True, order_weight=1.0)),
        200,
        description="Data Leakage in FedAvg: per-epoch dummy data, epoch-order prior, label counts",
    ),
}


# --- DMGAN: a malicious client's generator against the global model ------------------------------------------


@dataclass
class GanAttacker:
    """The malicious client of Deep Models Under the GAN (Hitaj et al. 2017): it wants representatives of a class
    it does not hold (`target`). The shared classifier has one class more than the data, `fake`, which no honest
    client ever labels; the global model is the discriminator. Every round the attacker trains its generator
    until the current global model takes the generated images for the target class, then trains locally on its
    own data plus generated images labelled `fake`, so the next global model must tell them apart from the real
    target class, which the victims' updates teach it: the generator is pushed toward the victims' images."""

    generator: nn.Module
    target: int
    fake: int
    latent: int = 32
    generator_steps: int = 100  # generator updates per round
    generator_lr: float = 1e-3
    fakes: int = 32  # generated images it trains on, labelled fake, per round
    batch_size: int = 64  # generated images per generator step
    seed: int = 0
    rounds: int = 0  # rounds taken part in, which seed each round's draws


def gan_attacker(
    input_shape: tuple[int, ...], target: int, fake: int, latent: int = 32, seed: int = 0, **settings
) -> GanAttacker:
    """A fresh attacker whose generator maps `latent` Gaussian noise to images in [0, 1] (a small MLP)."""
    torch.manual_seed(seed)
    generator = nn.Sequential(
        nn.Linear(latent, 256),
        nn.ReLU(),
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Linear(512, math.prod(input_shape)),
        nn.Sigmoid(),
        nn.Unflatten(1, input_shape),
    )
    return GanAttacker(generator, target, fake, latent, seed=seed, **settings)


def generate(attacker: GanAttacker, count: int, seed: int | None = None) -> torch.Tensor:
    """`count` images from the generator (seeded draws of the latent noise), without gradients."""
    device = next(attacker.generator.parameters()).device
    generator = torch.Generator().manual_seed(attacker.seed if seed is None else seed)
    with torch.no_grad():
        return attacker.generator(torch.randn(count, attacker.latent, generator=generator).to(device))


def train_generator(attacker: GanAttacker, global_model: nn.Module) -> float:
    """The generator's half of the game for one round: Adam steps that make the (frozen) global model classify
    generated images as the target class. Returns the model's final mean confidence in the target on them."""
    device = next(global_model.parameters()).device
    attacker.generator.to(device).train()
    optimizer = torch.optim.Adam(attacker.generator.parameters(), lr=attacker.generator_lr, betas=(0.5, 0.999))
    noise = torch.Generator().manual_seed(attacker.seed * 7919 + attacker.rounds)
    target = torch.full((attacker.batch_size,), attacker.target, device=device)
    for _ in range(attacker.generator_steps):
        z = torch.randn(attacker.batch_size, attacker.latent, generator=noise).to(device)
        logits = functional_call(
            global_model, {k: v.detach() for k, v in global_model.state_dict().items()}, (attacker.generator(z),)
        )
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(logits.detach().softmax(1)[:, attacker.target].mean())


def dmgan_data(
    attacker: GanAttacker, global_model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The malicious client's data for one FedAvg round: train the generator against the global model it
    received, then add `attacker.fakes` generated images labelled `fake` to its own samples, on which it trains
    locally as an honest client would (dmgan_update here, the Flower client in federation.py)."""
    train_generator(attacker, global_model)
    fakes = generate(attacker, attacker.fakes, seed=attacker.seed * 104729 + attacker.rounds)
    attacker.rounds += 1
    x = torch.cat([images, fakes.to(images.device)])
    y = torch.cat([labels, torch.full((len(fakes),), attacker.fake, dtype=labels.dtype, device=labels.device)])
    return x, y


def dmgan_update(
    attacker: GanAttacker,
    global_model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    setup: ClientSetup,
    epochs: int = 1,
    batch_size: int = 32,
) -> SharedUpdate:
    """The malicious client's turn in a simulated FedAvg round: dmgan_data, then defenses.client_update on it;
    the update is what it sends the server."""
    x, y = dmgan_data(attacker, global_model, images, labels)
    local = replace(setup, seed=setup.seed + attacker.rounds)
    return client_update(global_model, x, y, MechanismSpec("none", None), local, epochs=epochs, batch_size=batch_size)
