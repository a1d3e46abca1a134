"""Server side: the optimization attacks recover undefended images, labels are read off the last layer, the
restarts keep the best and survive diverging ones, batched restarts equal restarts run one by one, and the
adaptive attacker models the defense it knows."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attacks import ATTACKS, Reconstruction, Trajectory, best_of_restarts, optimization
from attacks.labels import recover_labels
from attacks.matching import gradient_distances, matching_losses
from data_sources import load_dataset
from defenses import ClientSetup, MechanismSpec, SharedUpdate, client_update
from metrics import reconstruction_scores
from models import create_model

NONE = MechanismSpec("none", None)


def small_digits(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digit images at a small size, so an attack converges in a couple of seconds."""
    split = load_dataset("digits")
    return F.interpolate(split.x_train[:16], size=(size, size), mode="bilinear").clamp(0, 1), split.y_train[:16]


def lenet(shape=(1, 16, 16), classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    return create_model("lenet", shape, classes)


def attack_cfg(**overrides) -> SimpleNamespace:
    return SimpleNamespace(**{"seed": 0, "restarts": 1, "iterations": 60, "log_every": 10, **overrides})


@pytest.mark.parametrize("name", ["dlg", "idlg"])
def test_undefended_lenet_batch_one_is_recovered(name):
    images, labels = small_digits()
    model = lenet()
    x, y = images[3:4], labels[3:4]
    update = client_update(model, x, y, NONE, ClientSetup())
    seen = []
    rec = ATTACKS[name].run(model, update, (1, 16, 16), 10, attack_cfg(), lambda *a: seen.append(a))
    scores = reconstruction_scores(x, rec.images)
    assert scores["psnr"][0] > 30 and scores["ssim"][0] > 0.95
    assert rec.labels.tolist() == y.tolist() and not rec.failed
    assert [s[0] for s in seen] == list(range(0, 61, 10))  # iteration 0, every 10th and the last
    assert seen[-1][3] < seen[0][3]  # the matching loss fell


def test_single_label_recovery_is_exact_for_every_class():
    model = lenet()
    images, _ = small_digits()
    for label in range(10):
        update = client_update(model, images[label : label + 1], torch.tensor([label]), NONE, ClientSetup())
        assert recover_labels(model, update, (1, 16, 16), 1).tolist() == [label]


def test_batch_label_recovery_counts_repeated_labels():
    model = lenet()
    images, _ = small_digits()
    labels = torch.tensor([1, 1, 1, 4, 7, 7, 2, 9])
    update = client_update(model, images[:8], labels, NONE, ClientSetup())
    recovered = recover_labels(model, update, (1, 16, 16), 8)
    counts_true, counts_rec = torch.bincount(labels, minlength=10), torch.bincount(recovered, minlength=10)
    assert len(recovered) == 8
    assert torch.minimum(counts_true, counts_rec).sum() >= 7  # at most one label misplaced


def test_gradient_distances():
    g = (torch.randn(3, 4), torch.randn(5))
    batch = lambda *grads: tuple(torch.stack(ts) for ts in zip(*grads, strict=True))  # candidates along dim 0
    candidates = batch(g, tuple(2 * t for t in g), tuple(-t for t in g), tuple(t + 1 for t in g))
    l2, cosine = gradient_distances(candidates, g, "l2"), gradient_distances(candidates, g, "cosine")
    assert l2[0] == 0 and l2[3] == pytest.approx(17.0)
    assert cosine[1].abs() < 1e-6  # cosine ignores scale
    assert cosine[2] == pytest.approx(2.0)
    # a confident model's gradients (norms near 1e-15 and below) keep the same cosine distances
    tiny = gradient_distances(tuple(1e-18 * c for c in candidates), tuple(1e-20 * t for t in g), "cosine")
    assert torch.allclose(tiny, cosine, atol=1e-5)


def fake_restarts(losses):
    """Restart r ends with loss losses[r] and logs it at iterations 0 and 2 (a diverged one stops logging)."""
    results = []
    for restart, loss in enumerate(losses):
        image, label = torch.full((1, 1, 4, 4), restart / 10), torch.tensor([restart])
        trajectory = Trajectory(2, 2)
        trajectory.log(0, image, label, 100.0)
        if math.isfinite(loss):
            trajectory.log(2, image, label, loss)
        results.append((Reconstruction(image, label, loss), trajectory))
    return results


def test_restarts_keep_the_lowest_loss_and_report_its_trajectory():
    seen = []
    rec = best_of_restarts(fake_restarts([3.0, 1.0, 2.0]), lambda *a: seen.append(a))
    assert rec.loss == 1.0 and rec.labels.tolist() == [1] and rec.failed_restarts == 0
    assert [(s[0], s[3]) for s in seen] == [(0, 100.0), (2, 1.0)]


def test_a_diverged_restart_is_failed_and_the_study_goes_on():
    seen = []
    rec = best_of_restarts(fake_restarts([math.nan, 5.0]), lambda *a: seen.append(a))
    assert rec.loss == 5.0 and not rec.failed and rec.failed_restarts == 1
    rec = best_of_restarts(fake_restarts([math.inf]), lambda *a: seen.append(a))
    assert rec.failed and rec.failed_restarts == 1
    assert math.isnan(seen[-1][3]) and seen[-1][0] == 2  # the missing log point is filled, marked NaN


def test_an_attack_on_a_non_finite_update_fails_without_raising():
    model = lenet()
    bad = tuple(torch.full_like(p, math.nan) for p in model.parameters())
    update = SharedUpdate(gradients=bad, batch_size=1, lr=0.05)
    rec = ATTACKS["idlg"].run(model, update, (1, 16, 16), 10, attack_cfg(iterations=3, restarts=2), lambda *a: None)
    assert rec.failed and rec.failed_restarts == 2
    assert torch.isfinite(rec.images).all() and rec.images.min() >= 0 and rec.images.max() <= 1


def test_batched_restarts_give_what_the_restarts_give_one_by_one():
    images, labels = small_digits()
    model = lenet()
    update = client_update(model, images[:2], labels[:2], NONE, ClientSetup())
    cfg = attack_cfg(iterations=15, log_every=5)
    known = recover_labels(model, update, (1, 16, 16), 2)
    recipe = optimization.RECIPES["ig"]
    together = optimization.optimise(recipe, model, update, (1, 16, 16), 10, known, [0, 1, 2], cfg)
    alone = [optimization.optimise(recipe, model, update, (1, 16, 16), 10, known, [r], cfg)[0] for r in range(3)]
    for (batched, _), (single, _) in zip(together, alone, strict=True):
        assert batched.loss == pytest.approx(single.loss, rel=1e-3)
        assert torch.allclose(batched.images, single.images, atol=1e-3)
    assert len({round(rec.loss, 6) for rec, _ in together}) == 3  # the restarts did start apart


MECHANISM_MODELS = [
    ("regularized", None, {"kappa": 1e-2}),
    ("dp-sgd", 8.0, {"max_grad_norm": 0.05, "noise_multiplier": 0.0}),
    ("prune", 0.5, {}),
    ("topk", 0.1, {}),
    ("quantize", 4.0, {}),
]


@pytest.mark.parametrize("name, strength, setup", MECHANISM_MODELS)
def test_the_adaptive_model_of_a_mechanism_explains_the_true_batch_better(name, strength, setup):
    """At the client's own batch, the adaptive attacker's model of the mechanism nearly reproduces what was
    shared (exactly where the mechanism is deterministic), far better than the plain gradient does."""
    images, labels = small_digits()
    model = lenet()
    x, y = images[:2], labels[:2]
    update = client_update(model, x, y, MechanismSpec(name, strength), ClientSetup(**setup))
    adaptive, plain = (matching_losses(model, x[None], y[None], update, "l2", a).item() for a in (True, False))
    scale = sum(g.pow(2).sum() for g in update.gradients).item()
    assert adaptive < 1e-3 * scale and adaptive < 0.1 * plain


@pytest.mark.parametrize("mechanism, strength, setup", [("regularized", None, {"kappa": 1e-2}), ("prune", 0.5, {})])
def test_the_adaptive_attacker_beats_the_naive_one(mechanism, strength, setup):
    images, labels = small_digits()
    model = lenet()
    x, y = images[3:4], labels[3:4]
    update = client_update(model, x, y, MechanismSpec(mechanism, strength), ClientSetup(**setup))
    psnr = {}
    for name in ("dlg", "dlg-naive"):
        rec = ATTACKS[name].run(model, update, (1, 16, 16), 10, attack_cfg(), lambda *a: None)
        psnr[name] = reconstruction_scores(x, rec.images)["psnr"][0]
    assert psnr["dlg"] > 30 and psnr["dlg"] > psnr["dlg-naive"] + 10
