"""Client side: each mechanism's defining property, and the parsing of mechanism specs."""

import math

import pytest
import torch

from defenses import (
    ClientSetup,
    MechanismSpec,
    add_noise,
    batch_gradients,
    client_update,
    parse_mechanisms,
    prune,
    quantize,
    top_k,
)
from models import create_model
from utils import UsageError

SHAPE = (1, 8, 8)


def lenet_and_batch(batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("lenet", SHAPE, 10)
    return model, torch.rand(batch, *SHAPE), torch.randint(0, 10, (batch,))


def random_grads():
    """Gradient-shaped tensors without exact zeros or ties (a real LeNet gradient has exact zeros where a
    kernel only ever sees padding, which would blur what pruning itself zeroed)."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=generator) for shape in [(12, 1, 5, 5), (12,), (10, 48), (10,)])


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9])
def test_prune_zeroes_exactly_the_smallest_fraction(fraction):
    for g, p in zip(random_grads(), prune(random_grads(), fraction), strict=True):
        zeroed = p == 0
        assert zeroed.sum() == int(fraction * g.numel())
        if zeroed.any() and (~zeroed).any():
            assert g[zeroed].abs().max() <= g[~zeroed].abs().min()  # the smallest went
        assert torch.equal(p[~zeroed], g[~zeroed])  # the rest is untouched


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_top_k_keeps_the_largest_fraction(fraction):
    for g, t in zip(random_grads(), top_k(random_grads(), fraction), strict=True):
        kept = t != 0
        assert kept.sum() == max(1, math.ceil(fraction * g.numel()))
        assert torch.equal(t[kept], g[kept])
        if (~kept).any():
            assert g[~kept].abs().max() <= g[kept].abs().min()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_leaves_at_most_two_to_the_bits_levels(bits):
    for g, q in zip(random_grads(), quantize(random_grads(), bits), strict=True):
        assert q.unique().numel() <= 2**bits
        step = (g.max() - g.min()) / (2**bits - 1)
        assert (q - g).abs().max() <= step / 2 + 1e-6  # rounding to the nearest level


def test_noise_has_the_asked_std():
    grads = random_grads()
    noisy = add_noise(grads, 0.1, torch.Generator().manual_seed(0))
    diff = torch.cat([(n - g).flatten() for n, g in zip(noisy, grads, strict=True)])
    assert diff.std() == pytest.approx(0.1, rel=0.05) and diff.mean().abs() < 0.01


def test_secure_aggregation_is_the_sum_of_the_clients_updates():
    model, x, y = lenet_and_batch(batch=6)
    others = [(x[2:4], y[2:4]), (x[4:6], y[4:6])]
    update = client_update(model, x[:2], y[:2], MechanismSpec("secagg", 3.0), ClientSetup(), others)
    parts = [batch_gradients(model, x[i : i + 2], y[i : i + 2]) for i in (0, 2, 4)]
    for shared, *clients in zip(update.gradients, *parts, strict=True):
        torch.testing.assert_close(shared, sum(clients))
    assert update.num_clients == 3 and update.batch_size == 2


def per_sample_grads(model, x, y):
    return [batch_gradients(model, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]


def test_dp_sgd_clips_each_sample_and_averages():
    model, x, y = lenet_and_batch(batch=4)
    clip = 0.05  # far below the per-sample gradient norms, so every sample is clipped
    setup = ClientSetup(max_grad_norm=clip, noise_multiplier=0.0)
    update = client_update(model, x, y, MechanismSpec("dp-sgd", 8.0), setup)
    expected = None
    for grads in per_sample_grads(model, x, y):
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        assert norm > clip
        scaled = [g * clip / (norm + 1e-6) / len(x) for g in grads]
        expected = scaled if expected is None else [e + s for e, s in zip(expected, scaled, strict=True)]
    for shared, want in zip(update.gradients, expected, strict=True):
        torch.testing.assert_close(shared, want, rtol=1e-4, atol=1e-7)
    total = torch.sqrt(sum(g.pow(2).sum() for g in update.gradients))
    assert total <= clip + 1e-6  # the mean of vectors of norm <= C has norm <= C


def test_dp_sgd_noise_has_the_calibrated_std():
    model, x, y = lenet_and_batch(batch=4)
    clean = client_update(model, x, y, MechanismSpec("dp-sgd", 8.0), ClientSetup(max_grad_norm=1.0))
    z = 0.7
    noisy = client_update(model, x, y, MechanismSpec("dp-sgd", 8.0), ClientSetup(max_grad_norm=1.0, noise_multiplier=z))
    diff = torch.cat([(n - c).flatten() for n, c in zip(noisy.gradients, clean.gradients, strict=True)])
    assert diff.numel() > 2000
    assert diff.std() == pytest.approx(z * 1.0 / 4, rel=0.06)  # z * C / B on the averaged gradient


def test_regularized_adds_the_penalty_gradient():
    model, x, y = lenet_and_batch()
    plain = batch_gradients(model, x, y)
    zero = client_update(model, x, y, MechanismSpec("regularized", None), ClientSetup(kappa=0.0)).gradients
    reg = client_update(model, x, y, MechanismSpec("regularized", None), ClientSetup(kappa=0.01)).gradients
    for p, z in zip(plain, zero, strict=True):
        torch.testing.assert_close(p, z)
    assert any(not torch.allclose(p, r) for p, r in zip(plain, reg, strict=True))
    assert all(not m._forward_hooks for m in model.modules())  # the regularizer's hooks were removed


def test_parse_expands_sweeps_and_fills_defaults():
    specs = parse_mechanisms(["none", "noise:1e-4,1e-3", "prune", "quantize:4", "dp-sgd:8", "secagg:3"])
    assert [s.spec for s in specs] == [
        "none",
        "noise:0.0001",
        "noise:0.001",
        "prune:0.2",
        "quantize:4",
        "dp-sgd:8",
        "secagg:3",
    ]


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("prune:1", "[0, 1)"),
        ("prune:-0.1", "[0, 1)"),
        ("quantize:0", "bits"),
        ("quantize:2.5", "bits"),
        ("dp-sgd:0", "ε in (0, 100]"),
        ("dp-sgd:500", "ε in (0, 100]"),
        ("noise:-1", "sigma"),
        ("topk:0", "(0, 1]"),
        ("secagg:1", "clients"),
        ("noise:abc", "not a number"),
        ("none:3", "takes no strength"),
        ("blur:2", "unknown mechanism 'blur'"),
    ],
)
def test_bad_specs_name_the_value_and_the_range(spec, fragment):
    with pytest.raises(UsageError) as err:
        parse_mechanisms([spec])
    assert fragment in str(err.value)
