"""The one-run audit: Steinke et al.'s and the f-DP bound on simulated mechanisms whose ε is known (valid, close
to it, the f-DP one at least as tight from the same guesses), and both in train.py on a DP and a plain run."""

import math

import numpy as np
import pytest

import config
import training
import utils
from audit import (
    audit_epsilon,
    dpsgd_blow_up_inverse,
    fdp_audit,
    fdp_rejects,
    guess_audit,
    guess_counts,
    ideal_scores,
)
from privacy import epsilon_spent

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]


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


def test_the_fdp_test_proves_nothing_at_chance_and_much_from_perfect_guesses():
    curve = dpsgd_blow_up_inverse(2.0, 1.0, 1)  # the Gaussian mechanism, μ = 1/2
    assert not fdp_rejects(curve, 1000, 1000, 500, 0.05)
    assert not fdp_rejects(curve, 1000, 1000, 560, 0.05)  # a little above chance is what μ = 1/2 allows
    assert fdp_rejects(curve, 1000, 1000, 1000, 0.05)
    needed = [min(v for v in range(k // 2, k + 1) if fdp_rejects(curve, 1000, k, v, 0.05)) / k for k in (50, 500)]
    assert needed[0] > needed[1] > 0.5  # fewer guesses must be right more often to prove as much


@pytest.mark.parametrize("sample_rate, steps", [(1.0, 1), (0.2, 10)])
def test_the_fdp_test_rarely_rejects_the_true_mechanism(sample_rate, steps):
    """Guesses from the exact mechanism (the likelihood-ratio scores of DP-SGD with z = 1) reject its own
    trade-off curve at level 5 % in at most about 5 % of 200 runs: the bound is valid (and conservative). They
    reject the curve of z = 2, twice too private, in most: the test has power."""
    rng = np.random.default_rng(2)
    true, too_private = dpsgd_blow_up_inverse(1.0, sample_rate, steps), dpsgd_blow_up_inverse(2.0, sample_rate, steps)
    rejected = np.zeros(2)
    for _ in range(200):
        members = rng.random(2000) < 0.5
        counts = guess_counts(ideal_scores(members, 1.0, sample_rate, steps, rng), members)
        rejected += [any(fdp_rejects(curve, 2000, g, v, 0.05) for g, v in counts) for curve in (true, too_private)]
    assert rejected[0] <= 0.08 * 200 and rejected[1] >= 0.6 * 200


def test_the_fdp_audit_recovers_the_gaussian_mechanism():
    """3 · 10^5 canaries of the Gaussian mechanism at z = 1 (ε = 4.39 at δ = 1e-5): the f-DP audit's z* lies
    just above the true z, and its ε just below the true ε; Steinke et al.'s bound is far lower."""
    rng = np.random.default_rng(3)
    members = rng.random(300_000) < 0.5
    scores = ideal_scores(members, 1.0, 1.0, 1, rng)
    fdp, steinke = fdp_audit(scores, members, 1.0, 1, 1e-5, "prv"), guess_audit(scores, members, 1e-5)
    eps = epsilon_spent(1.0, 1.0, 1, 1e-5, "prv")
    assert 1.0 < fdp["audit_fdp_noise_multiplier"] < 1.35
    assert 0.7 * eps < fdp["audit_fdp_epsilon"] < eps
    assert steinke["audit_epsilon"] < 0.6 * eps


@pytest.mark.parametrize("sample_rate, steps", [(1.0, 1), (0.1, 50)])
def test_the_fdp_audit_is_at_least_steinkes_from_the_same_guesses(sample_rate, steps):
    """On the mechanism it models (Mahloujifar et al.'s claim), and never above the accountant's ε."""
    rng = np.random.default_rng(4)
    members = rng.random(20_000) < 0.5
    scores = ideal_scores(members, 1.0, sample_rate, steps, rng)
    fdp = fdp_audit(scores, members, sample_rate, steps, 1e-5, "prv")["audit_fdp_epsilon"]
    steinke = guess_audit(scores, members, 1e-5)["audit_epsilon"]
    assert 0 < steinke <= fdp <= epsilon_spent(1.0, sample_rate, steps, 1e-5, "prv")


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
    assert 0 < float(dp["audit_fdp_epsilon"]) <= float(dp["epsilon"])
    assert float(dp["audit_fdp_noise_multiplier"]) >= float(dp["noise_multiplier"])
    assert int(dp["audit_canaries"]) == 1000 and int(dp["audit_correct"]) <= int(dp["audit_guesses"])
    assert 0.1 < float(dp["reconstruction_bound"]) < 1 and float(dp["prior_size"]) == 100


def test_the_audit_tells_a_plain_run(audited):
    plain, dp = audited["digits-cnn-none-s0"], audited["digits-cnn-dp-sgd-eps4-s0"]
    assert float(plain["audit_epsilon"]) > 2 * float(dp["audit_epsilon"])
    assert float(plain["audit_fdp_epsilon"]) > 2 * float(dp["audit_fdp_epsilon"])
    assert plain["reconstruction_bound"] == ""  # no formal guarantee, none invented


def test_an_audit_against_the_gdp_approximation_is_refused(tmp_path):
    with pytest.raises(utils.UsageError, match="--accountant gdp"):
        config.TrainConfig(audit_canaries=1000, accountant="gdp", out=tmp_path).validate()
