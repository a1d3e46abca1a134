"""Optimization attacks: find dummy data whose gradient matches the shared one.

All are one loop (`invert`) with a different recipe: DLG (Zhu et al. 2019) learns images and soft labels with
L-BFGS on the squared-L2 gradient distance; iDLG (Zhao et al. 2020) first reads the labels off the last layer
and learns the images only; dlg-adam is DLG with Adam; Inverting Gradients (Geiping et al. 2020) uses the
cosine distance, a total-variation prior, Adam on signed gradients with step decay, and keeps the images inside
the box [0, 1]. Every recipe matches the gradient the candidate would give under the protocol's mechanism
(attacks/matching.py); the `-naive` variants match the plain gradient, to show what modelling the defense buys.

Adam updates every pixel on its own, so the restarts of an Adam recipe run together as one batched optimisation
(the same result as running them one by one, in less time); L-BFGS couples all its variables through its line
search, so its restarts run one after another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from attacks import Attack, Observer, Reconstruction, Trajectory, best_of_restarts, num_reconstructed, total_variation
from attacks.labels import recover_labels
from attacks.matching import matching_losses
from defenses import SharedUpdate

if TYPE_CHECKING:
    from config import AttackConfig

LBFGS_MAX_ITER = 5  # function evaluations per L-BFGS iteration: enough for LeNet, cheap enough for 2 CPU cores


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "lbfgs" or "adam"
    distance: str  # "l2" or "cosine" (see attacks.matching.gradient_distances)
    learn_labels: bool  # True: optimise soft labels too (DLG); False: recover them analytically first (iDLG)
    lr: float
    tv_weight: float = 0.0
    signed: bool = False  # step on the sign of the gradient (Inverting Gradients)
    box: bool = False  # clamp the images into [0, 1] after every step
    decay: bool = False  # learning rate x0.1 at 3/8, 5/8 and 7/8 of the iterations
    adaptive: bool = True  # match the gradient as the protocol's mechanism shapes it


def invert(
    recipe: Recipe,
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    cfg: AttackConfig,
    observe: Observer,
) -> Reconstruction:
    """Reconstruct every sample behind `update` by gradient matching, keeping the best of cfg.restarts."""
    device = next(model.parameters()).device
    count = num_reconstructed(update)
    known = None if recipe.learn_labels else recover_labels(model, update, input_shape, count, cfg.seed).to(device)
    batches = [range(cfg.restarts)] if recipe.optimizer == "adam" else [[r] for r in range(cfg.restarts)]
    results = []
    for restarts in batches:
        results += optimise(recipe, model, update, input_shape, num_classes, known, list(restarts), cfg)
    return best_of_restarts(results, observe)


def optimise(
    recipe: Recipe,
    model: nn.Module,
    update: SharedUpdate,
    input_shape: tuple[int, ...],
    num_classes: int,
    known: torch.Tensor | None,
    restarts: list[int],
    cfg: AttackConfig,
) -> list[tuple[Reconstruction, Trajectory]]:
    """Run the given restarts as one batched optimisation: images (R, N, *input_shape), each restart drawn
    from its own seed, so a restart starts from the same point however the restarts are batched."""
    device = next(model.parameters()).device
    count = num_reconstructed(update)
    starts = [torch.Generator().manual_seed(cfg.seed * 1000 + r) for r in restarts]
    draws = [
        (torch.rand((count, *input_shape), generator=g), torch.randn((count, num_classes), generator=g)) for g in starts
    ]
    images = torch.stack([d[0] for d in draws]).to(device).requires_grad_()
    soft = torch.stack([d[1] for d in draws]).to(device).requires_grad_()
    variables = [images, soft] if recipe.learn_labels else [images]
    batch = len(restarts)

    def labels() -> torch.Tensor:
        return soft.detach().argmax(2) if recipe.learn_labels else known.expand(batch, count)

    def objective() -> torch.Tensor:
        targets = soft.softmax(2) if recipe.learn_labels else known.expand(batch, count)
        losses = matching_losses(model, images, targets, update, recipe.distance, recipe.adaptive)
        if recipe.tv_weight:
            losses = losses + recipe.tv_weight * torch.stack([total_variation(x) for x in images])
        return losses

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective().sum()  # restarts are independent: each one's gradient is its own loss's
        loss.backward()
        if recipe.signed:
            images.grad.sign_()
        return loss

    if recipe.optimizer == "lbfgs":
        optimizer = torch.optim.LBFGS(
            variables, lr=recipe.lr, max_iter=LBFGS_MAX_ITER, history_size=100, line_search_fn="strong_wolfe"
        )
    else:
        optimizer = torch.optim.Adam(variables, lr=recipe.lr)
    milestones = [int(cfg.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if recipe.decay else []
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    trajectories = [Trajectory(cfg.iterations, cfg.log_every) for _ in restarts]

    def log(iteration: int) -> torch.Tensor:
        losses = objective().detach().cpu()
        for r, trajectory in enumerate(trajectories):
            trajectory.log(iteration, images[r], labels()[r], float(losses[r]))
        return losses

    losses = log(0)
    for iteration in range(1, cfg.iterations + 1):
        optimizer.step(closure)
        scheduler.step()
        if recipe.box:
            with torch.no_grad():
                images.clamp_(0, 1)
        if iteration in trajectories[0].points:
            losses = log(iteration)
            if not torch.isfinite(losses).any():
                break
    final = labels().cpu()
    return [(Reconstruction(images[r].detach(), final[r], float(losses[r])), trajectories[r]) for r in range(batch)]


RECIPES = {
    "dlg": Recipe("lbfgs", "l2", learn_labels=True, lr=1.0),
    "idlg": Recipe("lbfgs", "l2", learn_labels=False, lr=1.0),
    "dlg-adam": Recipe("adam", "l2", learn_labels=True, lr=0.1),
    "ig": Recipe("adam", "cosine", learn_labels=False, lr=0.1, tv_weight=1e-2, signed=True, box=True, decay=True),
}
RECIPES |= {f"{name}-naive": replace(RECIPES[name], adaptive=False) for name in ("dlg", "ig")}

ATTACKS = {
    "dlg": Attack(partial(invert, RECIPES["dlg"]), 100, description="DLG: L-BFGS on images and soft labels, L2"),
    "idlg": Attack(partial(invert, RECIPES["idlg"]), 100, description="iDLG: analytic labels, then L-BFGS, L2"),
    "dlg-adam": Attack(partial(invert, RECIPES["dlg-adam"]), 1000, description="DLG's objective with Adam"),
    "ig": Attack(partial(invert, RECIPES["ig"]), 1000, description="Inverting Gradients: cosine, TV, signed Adam"),
    "dlg-naive": Attack(partial(invert, RECIPES["dlg-naive"]), 100, description="DLG matching the plain gradient"),
    "ig-naive": Attack(partial(invert, RECIPES["ig-naive"]), 1000, description="IG matching the plain gradient"),
}
