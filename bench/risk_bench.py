"""Benchmark of what ε guarantees (issue #11), printed as Markdown tables:

1. the reconstruction bound (riskcal) against Hayes et al.'s Monte Carlo estimator, at the issue's setting
   (z = 1, q = 0.01, T = 1000, κ = 0.1) and two more;
2. the prior-aware attack (attacks/prior_aware.py) against the bound over ε: success rate with its 95 %
   Clopper–Pearson interval, mlp on breast-cancer and mlp on digits (99 known examples, a prior of 10, q = 0.1,
   T = 100); the figure static/prior_aware.png;
3. the one-run audits at z = 1 on digits (`train.py --audit-canaries M`, cnn, 15 epochs): Steinke et al.'s and
   the f-DP ε lower bound from the same guesses against the accountant's ε, with the time the audit adds to
   the run; beside them, both audits of ideal canary scores drawn from the mechanism itself (no training),
   the most either can show at that setting and M;
4. both audits against the two papers' idealised numbers (10^6 canaries of the Gaussian mechanism at z = 1).

    uv run python bench/risk_bench.py              # everything (tables 3 and 4 alone: 16 min on 2 shared cores)
    uv run python bench/risk_bench.py --quick      # few trials and epochs, to check it runs
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
import utils  # noqa: E402
from audit import GUESS_FRACTIONS, fdp_audit, guess_audit, ideal_scores  # noqa: E402
from risk import monte_carlo_bound, reconstruction_bound  # noqa: E402


@dataclass
class BenchConfig:
    trials: int = 100  # prior-aware trainings per ε and model
    epsilons: tuple[float, ...] = (1.0, 4.0, 8.0, 16.0)  # of the prior-aware trainings
    canaries: tuple[int, ...] = (1000, 5000, 20000, 100000)  # audit sizes (the cnn has 156 010 coordinates)
    figure: Path = Path("static/prior_aware.png")
    quick: bool = False  # 5 trials, 2 ε, 2 epochs: a smoke run
    tables: tuple[int, ...] = (1, 2, 3, 4)


def bound_against_monte_carlo(root: Path, cfg: BenchConfig) -> list[list]:
    rows = []
    for z, q, steps in [(1.0, 0.01, 1000), (1.0, 1.0, 1), (2.0, 0.1, 100)]:
        start = time.perf_counter()
        bound = reconstruction_bound(z, q, steps, 10)
        seconds = time.perf_counter() - start
        estimate, error = monte_carlo_bound(z, q, steps, 10, samples=20_000 if cfg.quick else 200_000)
        rows.append([z, q, steps, 0.1, bound, estimate, error, abs(bound - estimate) / error, seconds])
    return rows


def prior_aware(root: Path, cfg: BenchConfig) -> list[list]:
    import torch

    from attacks.prior_aware import PriorAwareSetting, prior_aware_success
    from data_sources import load_dataset
    from models import create_model

    rows, curves = [], {}
    for dataset in ("breast-cancer", "digits"):
        data = load_dataset(dataset)
        known, pool = (data.x_train[:99], data.y_train[:99]), (data.x_test, data.y_test)
        make_model = functools.partial(create_model, "mlp", tuple(data.x_train.shape[1:]), data.num_classes)
        for eps in cfg.epsilons:
            torch.manual_seed(0)
            start = time.perf_counter()
            r = prior_aware_success(make_model, known, pool, PriorAwareSetting(eps), cfg.trials)
            seconds = time.perf_counter() - start
            inside = "below" if r["success_high"] < r["bound"] else "yes" if r["success_low"] <= r["bound"] else "NO"
            rows.append([f"mlp / {dataset}", eps, r["noise_multiplier"], r["success_rate"],
                         f"[{r['success_low']:.2f}, {r['success_high']:.2f}]", r["bound"], inside, seconds / cfg.trials])  # fmt: skip
            curves.setdefault(dataset, []).append(r)
    draw(curves, cfg.figure)
    return rows


def draw(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for i, (dataset, results) in enumerate(curves.items()):
        eps = [r["epsilon"] for r in results]
        rate = np.array([r["success_rate"] for r in results])
        err = [rate - [r["success_low"] for r in results], [r["success_high"] for r in results] - rate]
        ax.errorbar(
            eps, rate, yerr=err, color=f"C{i}", marker="o", capsize=3, ls="none", label=f"prior-aware, mlp / {dataset}"
        )
        ax.plot(eps, [r["bound"] for r in results], color=f"C{i}", ls="--", label=f"bound on any attack ({dataset})")
    ax.axhline(0.1, color="grey", lw=1, label="baseline: a guess among 10")
    ax.set(xscale="log", xlabel="ε of the training run (δ = 1e-5)", ylabel="probability of reconstruction", ylim=(0, 1))
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def audit(root: Path, cfg: BenchConfig) -> list[list]:
    """train.py on digits at the ε whose noise multiplier is 1 on its schedule, without and with canaries; both
    bounds from each run's guesses, and both from ideal canary scores drawn from the mechanism itself (the mean
    of three draws)."""
    from data_sources import load_dataset
    from privacy import epsilon_spent, poisson_schedule

    epochs = 2 if cfg.quick else 15
    rate, steps = poisson_schedule(len(load_dataset("digits").x_train), 32, epochs)
    eps = epsilon_spent(1.0, rate, steps, 1e-5, "prv")
    common = ["--dataset", "digits", "--privacy", "dp-sgd", "--epsilons", f"{eps:.4f}", "--epochs", str(epochs)]

    def run(canaries: int) -> dict:
        out = root / f"audit-{canaries}"
        train.main(["--out", str(out), *common, "--audit-canaries", str(canaries)])
        return utils.read_json(next(out.glob("*/metrics.json")))

    plain = run(0)
    rows = []
    for canaries in cfg.canaries:
        m = run(canaries)
        z, q, t = m["noise_multiplier"], m["sample_rate"], m["steps"]
        ideal = []
        for seed in range(3):
            rng = np.random.default_rng(seed)
            members = rng.random(canaries) < 0.5
            scores = ideal_scores(members, z, q, t, rng)
            ideal.append([guess_audit(scores, members, 1e-5)["audit_epsilon"],
                          fdp_audit(scores, members, q, t, 1e-5, "prv")["audit_fdp_epsilon"]])  # fmt: skip
        ideal_steinke, ideal_fdp = np.mean(ideal, axis=0)
        seconds = m["train_seconds"] + m["audit_seconds"]
        rows.append([canaries, m["epsilon"], m["audit_epsilon"], m["audit_epsilon"] / m["epsilon"],
                     m["audit_fdp_epsilon"], m["audit_fdp_epsilon"] / m["epsilon"], m["audit_fdp_noise_multiplier"],
                     ideal_steinke / m["epsilon"], ideal_fdp / m["epsilon"], m["accuracy"], m["train_seconds"],
                     m["audit_seconds"], seconds / plain["train_seconds"]])  # fmt: skip
    rows.append([0, plain["epsilon"], None, None, None, None, None, None, None, plain["accuracy"],
                 plain["train_seconds"], None, 1.0])  # fmt: skip
    return rows


def papers(root: Path, cfg: BenchConfig) -> list[list]:
    """Both audits against the two papers' idealised numbers: 10^6 canaries of the Gaussian mechanism at z = 1
    (ε = 4.39 at δ = 1e-5), scores drawn from the mechanism, one guess count each at full confidence (the
    papers plot the best k; here 1 % of M for Steinke et al., 0.1 % for the f-DP audit); then the shipped five
    k with the confidence split."""
    from privacy import epsilon_spent

    canaries = 100_000 if cfg.quick else 1_000_000
    rng = np.random.default_rng(0)
    members = rng.random(canaries) < 0.5
    scores = ideal_scores(members, 1.0, 1.0, 1, rng)
    eps = epsilon_spent(1.0, 1.0, 1, 1e-5, "prv")
    settings = [
        ("one k each", (0.01,), (0.001,), 2.61, 3.61),
        ("five k, split", GUESS_FRACTIONS, GUESS_FRACTIONS, None, None),
    ]
    rows = []
    for label, steinke_k, fdp_k, steinke_paper, fdp_paper in settings:
        steinke = guess_audit(scores, members, 1e-5, fractions=steinke_k)["audit_epsilon"]
        fdp = fdp_audit(scores, members, 1.0, 1, 1e-5, "prv", fractions=fdp_k)
        rows.append([canaries, label, eps, steinke, steinke_paper, fdp["audit_fdp_epsilon"], fdp_paper,
                     fdp["audit_fdp_noise_multiplier"]])  # fmt: skip
    return rows


TABLES = {
    1: ("The bound: riskcal against the Monte Carlo estimator", bound_against_monte_carlo,
        ["z", "q", "T", "κ", "riskcal", "Monte Carlo", "MC std. error", "|difference| / error", "riskcal s"]),
    2: ("The prior-aware attack against the bound (prior of 10, q = 0.1, T = 100)", prior_aware,
        ["model / data", "ε", "z", "success", "95 % interval", "bound", "within or below", "s / trial"]),
    3: ("One-run audits at z = 1 on digits (cnn, 15 epochs, batch 32): Steinke et al. and f-DP", audit,
        ["canaries", "accountant ε", "Steinke ε ≥", "ratio", "f-DP ε ≥", "ratio", "f-DP z* ≥", "ideal Steinke ratio",
         "ideal f-DP ratio", "accuracy", "train s", "audit s", "x no audit"]),
    4: ("Both audits against the papers' idealised Gaussian mechanism (z = 1)", papers,
        ["canaries", "guesses", "ε", "Steinke ε ≥", "paper (as quoted)", "f-DP ε ≥", "paper (as quoted)", "f-DP z* ≥"]),
}  # fmt: skip


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    if cfg.quick:
        cfg.trials, cfg.epsilons = 5, cfg.epsilons[:2]
    utils.print_measured_tables(TABLES, cfg.tables, cfg)


if __name__ == "__main__":
    utils.run_cli(main)
