"""What ε guarantees: the reconstruction bound (riskcal against Hayes et al.'s Monte Carlo estimator) and the
prior-aware attack that meets it. The one-run audit's tests are in test_audit.py."""

import numpy as np
import pytest
from scipy.stats import norm

from risk import monte_carlo_bound, poisson_log_likelihood_ratio, reconstruction_bound, release_bounds, run_bounds

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


def test_the_bound_agrees_with_the_monte_carlo_estimator():
    bound = reconstruction_bound(1.0, 0.01, 1000, 10)
    estimate, error = monte_carlo_bound(1.0, 0.01, 1000, 10, samples=40_000, seed=1)
    assert 0.1 < bound < 1
    assert abs(bound - estimate) < 4 * error + 0.003  # riskcal's curve is the symmetric (pessimistic) one


def test_one_release_is_the_gaussian_mechanism():
    for z in (0.5, 1.0, 3.0):
        assert reconstruction_bound(z, 1.0, 1, 10) == pytest.approx(norm.cdf(norm.ppf(0.1) + 1 / z), abs=1e-4)


def test_the_bound_runs_from_the_baseline_to_certainty():
    assert reconstruction_bound(100.0, 1.0, 1, 10) == pytest.approx(0.1, abs=0.01)  # noise hides everything
    assert reconstruction_bound(0.1, 1.0, 1, 10) > 0.999  # almost no noise: nothing hidden
    by_noise = [reconstruction_bound(z, 0.1, 100, 10) for z in (0.6, 1.0, 2.0, 4.0)]
    by_rate = [reconstruction_bound(1.0, q, 100, 10) for q in (0.01, 0.05, 0.2)]
    by_steps = [reconstruction_bound(1.0, 0.05, t, 10) for t in (10, 100, 1000)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert by_rate == sorted(by_rate) and by_steps == sorted(by_steps)
    assert reconstruction_bound(1.0, 0.05, 100, 1000) < reconstruction_bound(1.0, 0.05, 100, 10)  # a wider prior


def test_bound_columns_only_for_dp_rows():
    dp = run_bounds({"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1000}, 100)
    assert dp["reconstruction_bound"] == reconstruction_bound(1.0, 0.01, 1000, 10) > dp["reconstruction_bound_prior"]
    assert run_bounds({"noise_multiplier": None, "sample_rate": None, "steps": 40}, 100)["reconstruction_bound"] is None
    assert release_bounds({"noise_multiplier": float("nan")}, 10)["release_bound"] is None
    assert release_bounds({"noise_multiplier": 2.0}, 10)["release_bound"] == reconstruction_bound(2.0, 1.0, 1, 10)


def test_the_likelihood_ratio_does_not_overflow():
    assert np.isfinite(poisson_log_likelihood_ratio(np.array([1e6, -1e6]), 0.01, 0.5)).all()


def test_the_prior_aware_attack_is_near_certain_at_tiny_noise():
    import functools

    from attacks.prior_aware import PriorAwareSetting, prior_aware_success
    from data_sources import load_dataset
    from models import create_model

    data = load_dataset("digits")
    make_model = functools.partial(create_model, "mlp", tuple(data.x_train.shape[1:]), data.num_classes)
    setting = PriorAwareSetting(epsilon=500.0, sample_rate=0.5, steps=10, accountant="rdp")
    result = prior_aware_success(
        make_model, (data.x_train[:20], data.y_train[:20]), (data.x_test, data.y_test), setting, 10
    )
    assert result["noise_multiplier"] < 0.2 and result["bound"] > 0.99
    assert result["success_rate"] >= 0.9
