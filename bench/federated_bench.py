"""The federation's goals, each measured by real Flower runs (simulation engine, Ray) in a scratch directory:

1. 100 simulated clients x 10 rounds on digits (Dirichlet 0.5, the default cnn, every client every round):
   wall time, and the global model's accuracy;
2. the malicious-server trap in a real round: one client of ten gets an RtF or GIAvMP model (fcnn) in round 10
   with a batch of 64 for one local step; the share of that batch recovered (PSNR >= 30 dB) next to gradient
   mode's 0.95 (RtF) and 1.00 (GIAvMP), and whether the client's accuracy check flags the trap; RtF also at
   the honest learning rate, where float32 weights lose the gradient's digits;
3. the default run (`uv run federated.py`): wall time and accuracy.

    uv run python bench/federated_bench.py [--tables 1 2 3]

Wall times include starting Ray and the clients' processes (imports of PyTorch and Flower in each).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
import utils  # noqa: E402


@dataclass
class BenchConfig:
    tables: list[int] = field(default_factory=lambda: [1, 2, 3])  # which goals to measure


def federate(out: Path, **changes) -> tuple[dict, float]:
    """One federated run with `changes` to the defaults: its metrics.json and wall seconds."""
    import federated_runs

    cfg = dataclasses.replace(config.FederatedConfig(out=out), **changes)
    cfg.validate()
    start = time.perf_counter()
    federated_runs.run_study(cfg)
    seconds = time.perf_counter() - start
    return utils.read_json(out / federated_runs.run_name(cfg) / "metrics.json"), seconds


def many_clients(scratch: Path, _cfg: BenchConfig) -> list[list]:
    metrics, seconds = federate(scratch / "many", clients=100, rounds=10, attack_rounds=[])
    return [[100, 10, metrics["accuracy"], seconds, seconds / 10]]


def trap(scratch: Path, _cfg: BenchConfig) -> list[list]:
    rows = []
    for attack, lr, gradient_mode in (("rtf", 1e4, 0.95), ("giavmp", 1e4, 1.00), ("rtf", 0.05, 0.95)):
        metrics, seconds = federate(
            scratch / f"trap-{attack}-{lr:g}", model="fcnn", rounds=10, attack=attack, attack_rounds=[10], trap_lr=lr
        )
        run = scratch / f"trap-{attack}-{lr:g}" / metrics["run"] / "attacks" / f"{attack}-r10" / "metrics.json"
        scored = utils.read_json(run)
        rows.append(
            [attack, lr, scored["num_images"], scored["recovered_fraction"], gradient_mode, scored["psnr"],
             scored["honest_accuracy"], scored["received_accuracy"], scored["poisoning_detected"], seconds]
        )  # fmt: skip
    return rows


def default_run(scratch: Path, _cfg: BenchConfig) -> list[list]:
    metrics, seconds = federate(scratch / "default")
    (attack,) = metrics["attacks"]
    return [[metrics["rounds"], metrics["accuracy"], metrics["attack"], attack["recovered_fraction"], seconds]]


TABLES = {
    1: ("100 simulated clients x 10 rounds on digits", many_clients,
        ["clients", "rounds", "accuracy", "seconds", "seconds per round"]),
    2: ("Malicious trap in a real round (fcnn, B = 64, one client of 10, round 10)", trap,
        ["attack", "trap lr", "batch", "recovered (>= 30 dB)", "gradient mode", "PSNR (dB)",
         "last model's accuracy", "trap's accuracy", "flagged", "seconds"]),
    3: ("The default run (uv run federated.py)", default_run,
        ["rounds", "accuracy", "attack", "recovered (>= 30 dB)", "seconds"]),
}  # fmt: skip


def main() -> None:
    cfg = tyro.cli(BenchConfig, description=__doc__)
    bad = [t for t in cfg.tables if t not in TABLES]
    if bad:
        raise utils.UsageError(f"--tables {bad}: choose among {', '.join(map(str, TABLES))}.")
    utils.print_measured_tables(TABLES, cfg.tables, cfg)


if __name__ == "__main__":
    utils.run_cli(main)
