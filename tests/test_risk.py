"""What ε guarantees: the reconstruction bound (riskcal against Hayes et al.'s Monte Carlo estimator) and the
one-run audit (its statistic on simulated mechanisms, and in train.py on a DP and a plain run)."""

import math

import numpy as np
import pytest
from scipy.stats import norm

import config
import training
import utils
from audit import audit_epsilon, guess_audit
from privacy import epsilon_spent
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


def test_the_audit_never_exceeds_the_epsilon_of_randomized_response():
    """Randomized response at ε: each guess is right with probability e^ε / (1 + e^ε), exactly the worst case
    the audit's test is built on. Its 95 % bound may exceed ε in at most about 5 % of runs (here: at most 10 %
    of 200), and is close to ε otherwise."""
    rng = np.random.default_rng(0)
    eps, m = 2.0, 2000
    right = rng.random((200, m)) < 1 / (1 + math.exp(-eps))
    bounds = np.array([audit_epsilon(m, m, int(r.sum()), 1e-5) for r in right])
    assert (bounds > eps).mean() <= 0.1 and np.median(bounds) > 0.85 * eps
    assert audit_epsilon(1000, 1000, 500, 1e-5) == 0.0  # chance level proves nothing
    assert audit_epsilon(1000, 1000, 1000, 1e-5) > 5  # all right: as large as 1000 guesses can show


def test_the_audit_of_a_gaussian_mechanism_stays_below_its_epsilon():
    rng = np.random.default_rng(1)
    members = rng.random(5000) < 0.5
    scores = rng.normal(members.astype(float), 1.0)  # z = 1, one step, no sampling
    audit = guess_audit(scores, members, 1e-5)
    assert 1.0 < audit["audit_epsilon"] <= epsilon_spent(1.0, 1.0, 1, 1e-5, "prv")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    cfg = config.TrainConfig(
        dataset="digits", privacy=["none", "dp-sgd"], epsilons=[4.0], epochs=3, accountant="rdp",
        audit_canaries=1000, out=out,
    )  # fmt: skip
    training.run_study(cfg)
    return {r["run"]: r for r in utils.read_csv(out / "summary.csv")}


def test_the_audit_of_a_dp_run_stays_below_the_accountants_epsilon(audited):
    dp = audited["digits-cnn-dp-sgd-eps4-s0"]
    assert 0 < float(dp["audit_epsilon"]) <= float(dp["epsilon"])
    assert int(dp["audit_canaries"]) == 1000 and int(dp["audit_correct"]) <= int(dp["audit_guesses"])
    assert 0.1 < float(dp["reconstruction_bound"]) < 1 and float(dp["prior_size"]) == 100


def test_the_audit_tells_a_plain_run(audited):
    plain, dp = audited["digits-cnn-none-s0"], audited["digits-cnn-dp-sgd-eps4-s0"]
    assert float(plain["audit_epsilon"]) > 2 * float(dp["audit_epsilon"])
    assert plain["reconstruction_bound"] == ""  # no formal guarantee, none invented


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
