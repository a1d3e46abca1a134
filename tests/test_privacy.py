"""DP-SGD as the study uses it (privacy.make_private over Opacus) and the PDP-SGD regularizer."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from defenses import ClientSetup, dp_sgd_gradients
from models import FrozenBackbone, create_model
from privacy import WeightNoiseRegularizer, epsilon_spent, make_private, noise_multiplier_for, poisson_schedule
from utils import UsageError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus advice and hook notes, not findings


def _private_cnn(max_grad_norm: float, accountant: str, target_epsilon: float = 8.0, epochs: int = 2):
    torch.manual_seed(0)
    model = create_model("cnn", (1, 12, 12), 3)
    x, y = torch.rand(64, 1, 12, 12), torch.randint(0, 3, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    z = noise_multiplier_for(target_epsilon, 1e-5, *poisson_schedule(64, 16, epochs), accountant)
    engine, module, optimizer, _, loader = make_private(
        model, optimizer, loader, noise_multiplier=z, max_grad_norm=max_grad_norm, accountant=accountant, seed=0
    )
    return model, engine, module, optimizer, loader, x, y


def test_every_per_sample_gradient_is_clipped_before_noise():
    """With the noise switched off, Opacus' summed gradient must equal the sum of each sample's own gradient,
    computed by hand on an unwrapped copy and clipped to max_grad_norm."""
    clip = 0.05  # far below the raw per-sample norms, so every sample is clipped
    model, _, module, optimizer, _, x, y = _private_cnn(clip, "gdp")  # the fastest accountant; noise is off
    reference = create_model("cnn", (1, 12, 12), 3)
    reference.load_state_dict(model.state_dict())
    xb, yb = x[:8], y[:8]

    expected = [torch.zeros_like(p) for p in reference.parameters()]
    for xi, yi in zip(xb, yb, strict=True):
        grads = torch.autograd.grad(F.cross_entropy(reference(xi[None]), yi[None]), list(reference.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > clip  # the test only means something if clipping bites
        scale = min(1.0, clip / (norm.item() + 1e-6))
        clipped = [g * scale for g in grads]
        assert torch.sqrt(sum(c.pow(2).sum() for c in clipped)) <= clip + 1e-6
        expected = [e + c for e, c in zip(expected, clipped, strict=True)]

    optimizer.noise_multiplier = 0.0
    optimizer.zero_grad()
    F.cross_entropy(module(xb), yb).backward()
    assert optimizer.pre_step()  # clip, accumulate, add (zero) noise, scale by the expected batch size
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad * optimizer.expected_batch_size, e, atol=1e-6, rtol=1e-4)


def test_the_attacks_dp_sgd_step_is_opacus_step():
    """The shared update of `dp-sgd` (defenses.py, torch.func) must be what Opacus' DPOptimizer produces
    from the same batch: clipped per-sample gradients, averaged over the batch (noise off on both sides)."""
    clip = 0.05
    model, _, module, optimizer, _, x, y = _private_cnn(clip, "gdp")
    reference = create_model("cnn", (1, 12, 12), 3)
    reference.load_state_dict(model.state_dict())
    xb, yb = x[:16], y[:16]  # the loader's expected batch size, so both divide by the same B
    ours = dp_sgd_gradients(reference, xb, yb, ClientSetup(max_grad_norm=clip), torch.Generator().manual_seed(0))
    optimizer.noise_multiplier = 0.0
    optimizer.zero_grad()
    F.cross_entropy(module(xb), yb).backward()
    assert optimizer.pre_step()
    for p, g in zip(model.parameters(), ours, strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-7, rtol=1e-4)


def test_attack_noise_is_calibrated_like_training():
    """Training and dp-sgd:EPS in the attack study ask the accountant with Opacus' own sampling set-up, so they
    get the noise multiplier that Opacus' make_private_with_epsilon would give for that ε (here with N not a
    multiple of B)."""
    torch.manual_seed(0)
    model = create_model("mlp", (6,), 2)
    loader = DataLoader(TensorDataset(torch.rand(70, 6), torch.randint(0, 2, (70,))), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, optimizer, loader = PrivacyEngine(accountant="rdp").make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=8.0, target_delta=1e-5, epochs=3,
        max_grad_norm=1.0, poisson_sampling=True,
    )  # fmt: skip
    sample_rate, steps = poisson_schedule(70, 16, 3)
    assert sample_rate == pytest.approx(loader.sample_rate) and steps == 3 * len(loader)
    assert noise_multiplier_for(8.0, 1e-5, sample_rate, steps, "rdp") == pytest.approx(optimizer.noise_multiplier)


def test_noise_multiplier_and_epsilon_spent_agree():
    """The conversion the attacks use: the noise found for a target spends at most that target, close to it."""
    for target in (1.0, 8.0):
        sigma = noise_multiplier_for(target, 1e-5, sample_rate=0.2, steps=75, accountant="rdp")
        assert 0.95 * target <= epsilon_spent(sigma, 0.2, 75, 1e-5, "rdp") <= target
    assert noise_multiplier_for(1.0, 1e-5, 0.2, 75, "gdp") > noise_multiplier_for(8.0, 1e-5, 0.2, 75, "gdp")
    assert epsilon_spent(1.0, 0.2, 0, 1e-5, "prv") == 0.0


def test_make_private_spends_at_most_the_target_and_close_to_it():
    """The default accountant (PRV) over Poisson-sampled steps: after the planned epochs, ε <= target."""
    _, engine, _, optimizer, loader, _, _ = _private_cnn(1.0, "prv", target_epsilon=8.0, epochs=2)
    assert loader.sample_rate == pytest.approx(0.25)
    assert optimizer.noise_multiplier > 0
    for _ in range(2 * len(loader)):  # what each optimizer.step() records
        engine.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=loader.sample_rate)
    assert 0.9 * 8.0 <= engine.get_epsilon(1e-5) <= 8.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_dp_sgd_step_runs_with_the_model_on_the_gpu():
    """Opacus draws the noise on the gradients' device: a CPU noise generator fails there."""
    torch.manual_seed(0)
    model = create_model("cnn", (1, 12, 12), 3).cuda()
    loader = DataLoader(TensorDataset(torch.rand(64, 1, 12, 12), torch.randint(0, 3, (64,))), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    z = noise_multiplier_for(8.0, 1e-5, *poisson_schedule(64, 16, 1), "prv")
    _, module, optimizer, _, loader = make_private(
        model, optimizer, loader, noise_multiplier=z, max_grad_norm=1.0, accountant="prv", seed=0
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(iter(loader))
    F.cross_entropy(module(x.cuda()), y.cuda()).backward()
    optimizer.step()
    assert all(
        torch.isfinite(p).all() and not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True)
    )


def test_regularizer_matches_its_formula_on_a_linear_layer():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    reg = WeightNoiseRegularizer(layer, kappa=0.01)
    layer(x)
    expected = 0.01 * (x.pow(2) @ layer.weight.pow(2).T).sum(1).mean()
    torch.testing.assert_close(reg.penalty(), expected)
    reg.remove()


def test_regularizer_is_positive_and_acts_on_trainable_weights_only():
    """On a frozen backbone the backbone gets no gradient (it is not regularized), the head does."""
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = FrozenBackbone(backbone, 4, 2, image_size=16).train()
    reg = WeightNoiseRegularizer(model, kappa=0.01)
    model(torch.rand(3, 1, 16, 16))
    penalty = reg.penalty()
    assert penalty > 0
    penalty.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    assert reg.terms == []  # penalty() clears what it used


def test_regularizer_covers_conv_layers_and_refuses_a_model_with_nothing_to_regularize():
    model = create_model("cnn", (1, 12, 12), 2)
    reg = WeightNoiseRegularizer(model, kappa=1.0)
    model(torch.rand(2, 1, 12, 12))
    assert len(reg.terms) == 5  # three convolutions, fc and classifier
    with pytest.raises(ValueError):
        WeightNoiseRegularizer(nn.Linear(3, 2).requires_grad_(False), kappa=1.0)


def test_a_budget_no_noise_reaches_is_a_usage_error():
    with pytest.raises(UsageError, match="no noise multiplier reaches ε = 0.0001"):
        noise_multiplier_for(1e-4, 1e-5, 0.2, 75, "rdp")
