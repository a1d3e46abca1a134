"""Optimization attacks: find dummy data whose gradient matches the shared one.

All four are one loop (`invert`) with a different recipe: DLG (Zhu et al. 2019) learns images and soft
labels with L-BFGS on the squared-L2 gradient distance; iDLG (Zhao et al. 2020) first reads the labels off
the last layer and learns the images only; dlg-adam is DLG with Adam; Inverting Gradients (Geiping et al.
2020) uses the cosine distance, a total-variation prior, Adam on signed gradients with step decay, and
keeps the images inside the box [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from attacks import (
    Attack,
    Observer,
    Reconstruction,
    Trajectory,
    best_of_restarts,
    gradient_distance,
    model_gradients,
    num_reconstructed,
    target_gradients,
    total_variation,
)
from attacks.labels import recover_labels
from defenses import SharedUpdate

if TYPE_CHECKING:
    from config import AttackConfig

LBFGS_MAX_ITER = 5  # function evaluations per L-BFGS iteration: enough for LeNet, cheap enough for 2 CPU cores


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "lbfgs" or "adam"
    distance: str  # "l2" or "cosine" (see attacks.gradient_distance)
    learn_labels: bool  # True: optimise soft labels too (DLG); False: recover them analytically first (iDLG)
    lr: float
    tv_weight: float = 0.0
    signed: bool = False  # step on the sign of the gradient (Inverting Gradients)
    box: bool = False  # clamp the images into [0, 1] after every step
    decay: bool = False  # learning rate x0.1 at 3/8, 5/8 and 7/8 of the iterations


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
    target = tuple(g.to(device) for g in target_gradients(update))
    count = num_reconstructed(update)
    known = None if recipe.learn_labels else recover_labels(model, update, input_shape, count, cfg.seed).to(device)

    def attempt(restart: int, trajectory: Trajectory) -> Reconstruction:
        generator = torch.Generator().manual_seed(cfg.seed * 1000 + restart)
        images = torch.rand((count, *input_shape), generator=generator).to(device).requires_grad_()
        soft = torch.randn((count, num_classes), generator=generator).to(device).requires_grad_()
        variables = [images, soft] if recipe.learn_labels else [images]
        labels = (lambda: soft.detach().argmax(1)) if recipe.learn_labels else (lambda: known)

        def objective() -> torch.Tensor:
            targets = soft.softmax(1) if recipe.learn_labels else known
            loss = gradient_distance(model_gradients(model, images, targets), target, recipe.distance)
            return loss + recipe.tv_weight * total_variation(images) if recipe.tv_weight else loss

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = objective()
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
        loss = objective().item()
        trajectory.log(0, images, labels(), loss)
        for iteration in range(1, cfg.iterations + 1):
            optimizer.step(closure)
            scheduler.step()
            if recipe.box:
                with torch.no_grad():
                    images.clamp_(0, 1)
            if iteration in trajectory.points:
                loss = objective().item()
                trajectory.log(iteration, images, labels(), loss)
                if not math.isfinite(loss):
                    break
        return Reconstruction(images.detach(), labels().cpu(), loss)

    return best_of_restarts(cfg.restarts, attempt, cfg.iterations, cfg.log_every, observe)


RECIPES = {
    "dlg": Recipe("lbfgs", "l2", learn_labels=True, lr=1.0),
    "idlg": Recipe("lbfgs", "l2", learn_labels=False, lr=1.0),
    "dlg-adam": Recipe("adam", "l2", learn_labels=True, lr=0.1),
    "ig": Recipe("adam", "cosine", learn_labels=False, lr=0.1, tv_weight=1e-4, signed=True, box=True, decay=True),
}

ATTACKS = {
    "dlg": Attack(partial(invert, RECIPES["dlg"]), 100, description="DLG: L-BFGS on images and soft labels, L2"),
    "idlg": Attack(partial(invert, RECIPES["idlg"]), 100, description="iDLG: analytic labels, then L-BFGS, L2"),
    "dlg-adam": Attack(partial(invert, RECIPES["dlg-adam"]), 1000, description="DLG's objective with Adam"),
    "ig": Attack(partial(invert, RECIPES["ig"]), 1000, description="Inverting Gradients: cosine, TV, signed Adam"),
}
