"""Server side: the optimization attacks recover undefended images, labels are read off the last layer, and
the restarts loop keeps the best and survives diverging restarts."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attacks import ATTACKS, Reconstruction, best_of_restarts, gradient_distance
from attacks.labels import recover_labels
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
    assert gradient_distance(g, g, "l2") == 0
    assert gradient_distance(tuple(2 * t for t in g), g, "cosine").abs() < 1e-6  # cosine ignores scale
    assert gradient_distance(tuple(-t for t in g), g, "cosine") == pytest.approx(2.0)
    assert gradient_distance(tuple(t + 1 for t in g), g, "l2") == pytest.approx(17.0)


def fake_attempt(losses):
    """An attack whose restart r ends with loss losses[r] and logs it at iterations 0 and 2."""

    def attempt(restart, trajectory):
        image = torch.full((1, 1, 4, 4), restart / 10)
        trajectory.log(0, image, torch.tensor([restart]), 100.0)
        if math.isfinite(losses[restart]):
            trajectory.log(2, image, torch.tensor([restart]), losses[restart])
        return Reconstruction(image, torch.tensor([restart]), losses[restart])

    return attempt


def test_restarts_keep_the_lowest_loss_and_report_its_trajectory():
    seen = []
    rec = best_of_restarts(3, fake_attempt([3.0, 1.0, 2.0]), 2, 2, lambda *a: seen.append(a))
    assert rec.loss == 1.0 and rec.labels.tolist() == [1] and rec.failed_restarts == 0
    assert [(s[0], s[3]) for s in seen] == [(0, 100.0), (2, 1.0)]


def test_a_diverged_restart_is_failed_and_the_study_goes_on():
    seen = []
    rec = best_of_restarts(2, fake_attempt([math.nan, 5.0]), 2, 2, lambda *a: seen.append(a))
    assert rec.loss == 5.0 and not rec.failed and rec.failed_restarts == 1
    rec = best_of_restarts(1, fake_attempt([math.inf]), 2, 2, lambda *a: seen.append(a))
    assert rec.failed and rec.failed_restarts == 1
    assert math.isnan(seen[-1][3]) and seen[-1][0] == 2  # the missing log point is filled, marked NaN


def test_an_attack_on_a_non_finite_update_fails_without_raising():
    model = lenet()
    bad = tuple(torch.full_like(p, math.nan) for p in model.parameters())
    update = SharedUpdate(gradients=bad, batch_size=1, lr=0.05)
    rec = ATTACKS["idlg"].run(model, update, (1, 16, 16), 10, attack_cfg(iterations=3, restarts=2), lambda *a: None)
    assert rec.failed and rec.failed_restarts == 2
    assert torch.isfinite(rec.images).all() and rec.images.min() >= 0 and rec.images.max() <= 1
