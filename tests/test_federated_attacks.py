"""Attacks on FedAvg updates (attacks/federated.py) and the client's local training behind them (defenses.py)."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import config
from attacks import ATTACKS
from attacks.federated import dmgan_update, epoch_orders, gan_attacker, generate, label_counts, simulated_update
from defenses import ClientSetup, MechanismSpec, client_update, trainable_parameters
from models import MLP
from utils import UsageError

NONE = MechanismSpec("none", None)
SHAPE = (1, 6, 6)


def tiny_model(classes: int = 4, hidden: int = 32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP(SHAPE, classes, hidden=hidden)


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """Images in [0, 1] with structure (bilinear upsampled 3x3 noise), like the digits the attacks are run on."""
    coarse = torch.rand((count, 1, 3, 3), generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False).clamp(0, 1)


def settings(iterations: int, restarts: int = 1) -> SimpleNamespace:
    return SimpleNamespace(seed=0, restarts=restarts, iterations=iterations, log_every=iterations)


def test_local_training_equals_a_torch_sgd_loop():
    """The shared update of E epochs in batches of B is (sent - returned weights) / lr of plain torch SGD over
    the same shuffles (the client's seed draws one permutation per epoch)."""
    model = tiny_model()
    x, y = smooth_images(7, 1), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    setup = ClientSetup(lr=0.3, seed=5)
    update = client_update(model, x, y, NONE, setup, epochs=3, batch_size=3)
    assert (update.local_steps, update.local_epochs, update.num_samples, update.batch_size) == (9, 3, 7, 3)

    trained = copy.deepcopy(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=setup.lr)
    shuffle = torch.Generator().manual_seed(setup.seed)
    for _ in range(3):
        for batch in torch.randperm(7, generator=shuffle).split(3):
            optimizer.zero_grad()
            F.cross_entropy(trained(x[batch]), y[batch]).backward()
            optimizer.step()
    for shared, sent, returned in zip(update.gradients, model.parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(shared, (sent - returned).detach() / setup.lr, atol=1e-5, rtol=1e-4)
    assert not torch.equal(update.gradients[0], client_update(model, x, y, NONE, setup).gradients[0])


@pytest.mark.parametrize("mechanism", [NONE, MechanismSpec("dp-sgd", 8.0)])
def test_the_attackers_simulation_reproduces_the_clients_update(mechanism):
    """Given the true samples, the attacker's simulation of the local training (three epochs of one full batch,
    so the private shuffling cannot matter) gives the shared update; under DP-SGD without noise it models the
    per-sample clipping, which the plain simulation does not."""
    model = tiny_model()
    x, y = smooth_images(4, 7), torch.tensor([0, 1, 2, 1])
    setup = ClientSetup(lr=0.5, max_grad_norm=0.05, noise_multiplier=0.0)
    update = client_update(model, x, y, mechanism, setup, epochs=3, batch_size=4)
    orders = epoch_orders(update, seed=0)
    simulated = simulated_update(model, x[None], y, update, orders)
    for s, g in zip(simulated, update.gradients, strict=True):
        torch.testing.assert_close(s.detach(), g, atol=1e-5, rtol=1e-4)
    if mechanism.name == "dp-sgd":
        plain = simulated_update(model, x[None], y, update, orders, adaptive=False)
        assert not torch.allclose(plain[0].detach(), update.gradients[0], atol=1e-3)


def test_one_local_step_is_the_gradient_and_ig_weight_is_ig():
    """With one local step the update is the gradient itself, and ig-weight reconstructs exactly what the
    gradient-mode Inverting Gradients does from the same seed."""
    model = tiny_model()
    x, y = smooth_images(2, 2), torch.tensor([1, 3])
    one_step = client_update(model, x, y, NONE, ClientSetup(), epochs=1, batch_size=2)
    assert one_step.local_steps == 1 and one_step.num_samples is None
    cfg = settings(30)
    weight = ATTACKS["ig-weight"].run(model, one_step, SHAPE, 4, cfg, lambda *a: None)
    gradient = ATTACKS["ig"].run(model, one_step, SHAPE, 4, cfg, lambda *a: None)
    assert torch.equal(weight.images, gradient.images) and torch.equal(weight.labels, gradient.labels)


def test_label_counts_from_a_multi_step_update():
    """DLF's label counts: on a fresh model (predictions near uniform) the sum of the steps' bias gradients
    gives every class's count exactly, here 3/2/1/0 over 2 epochs of batches of 3."""
    model = tiny_model(seed=3)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    update = client_update(model, smooth_images(6, 4), y, NONE, ClientSetup(lr=0.1), epochs=2, batch_size=3)
    assert label_counts(model, update, SHAPE).tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("attack", ["ig-multi", "dlf"])
def test_multi_step_attacks_recover_a_tiny_batch(attack):
    """Three local steps (one epoch of three single-image batches) on a tiny model: simulating them on dummy
    data recovers the three images (PSNR > 25 dB each, matched by label)."""
    model = tiny_model(hidden=64, seed=1)
    x, y = smooth_images(3, 6), torch.tensor([0, 1, 2])
    update = client_update(model, x, y, NONE, ClientSetup(lr=0.1), epochs=1, batch_size=1)
    assert update.local_steps == 3
    rec = ATTACKS[attack].run(model, update, SHAPE, 4, settings(300), lambda *a: None)
    assert rec.labels.tolist() == [0, 1, 2]
    mse = ((rec.images - x) ** 2).flatten(1).mean(1)
    assert (10 * torch.log10(1 / mse) > 25).all(), mse


def test_dmgan_generator_moves_toward_the_class_it_lacks():
    """Two classes of images (bright left half, bright right half); the attacker holds only the left ones and
    targets the right. After a few FedAvg rounds with an honest client holding both, its generator's images
    are brighter on the right than on the left, unlike its untrained generator's."""
    left, right = torch.zeros(SHAPE), torch.zeros(SHAPE)
    left[..., :3], right[..., 3:] = 1.0, 1.0
    noise = torch.Generator().manual_seed(0)
    sample = lambda proto, n: (proto + 0.1 * torch.randn((n, *SHAPE), generator=noise)).clamp(0, 1)
    honest_x = torch.cat([sample(left, 16), sample(right, 16)])
    honest_y = torch.tensor([0] * 16 + [1] * 16)
    own_x, own_y = sample(left, 16), torch.zeros(16, dtype=torch.long)
    model = tiny_model(classes=3, seed=0)  # classes 0 and 1, and the attacker's fake class 2
    attacker = gan_attacker(SHAPE, target=1, fake=2, seed=0, generator_steps=30, generator_lr=3e-3)
    contrast = lambda images: float(images[..., 3:].mean() - images[..., :3].mean())
    before = contrast(generate(attacker, 64))
    setup = ClientSetup(lr=0.5)
    for _ in range(8):
        updates = [
            client_update(model, honest_x, honest_y, NONE, setup, epochs=1, batch_size=8),
            dmgan_update(attacker, model, own_x, own_y, setup, epochs=1, batch_size=8),
        ]
        with torch.no_grad():
            for i, p in enumerate(trainable_parameters(model)):
                p -= setup.lr * sum(u.gradients[i] for u in updates) / len(updates)
    after = contrast(generate(attacker, 64))
    assert after > 0.3 and after > before + 0.3, (before, after)


def test_attacks_never_import_the_evaluation():
    """The threat-model boundary: no module of attacks/ imports the evaluation side (evaluation, metrics)."""
    for path in (Path(__file__).resolve().parents[1] / "attacks").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"evaluation", "metrics"}, path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--local-epochs", "0"], "--local-epochs 0"),
        (["--local-batches", "4"], "cannot read"),  # the default attack (auto) reads one gradient, not FedAvg
        (["--local-epochs", "2", "--attacks", "dlf", "ig"], "ig cannot read"),
    ],
)
def test_local_options_are_checked_before_any_work(args, message):
    with pytest.raises(UsageError, match=message):
        config.parse(config.AttackConfig, args)
    config.parse(config.AttackConfig, ["--local-epochs", "2", "--attacks", "dlf", "ig-multi", "ig-weight"])
