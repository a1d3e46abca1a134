"""The federated study that `uv run federated.py` runs: one Flower run (federation.py's apps on the simulation
engine) per configuration, into runs/federated/<run>/ as every study here writes its runs: config.json,
history.csv (per round: the global model's test accuracy and loss, the ε spent, each client's ε), metrics.json
last; and for every attack round an attack run in <run>/attacks/<attack>-r<round>/ with the files of
gradient mode (config.json, trajectory.csv, snapshots.npz, reconstruction.png, metrics.json), which
analysis.py reads beside runs/attack. A finished run is skipped; summary.csv and summary.md are rebuilt from
the run directories.

The Recorder is the evaluation side of the federation: it alone holds the clients' data (to score what the
attack observes), and it gives the server's attack nothing but an `observe` callback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import config
import utils
from attacks import Observer, Reconstruction
from defenses import SharedUpdate
from evaluation import RunRecord

SUMMARY_COLUMNS = [
    "run", "dataset", "model", "clients", "alpha", "fraction", "rounds", "local_epochs", "batch_size", "privacy",
    "epsilon", "delta", "noise_multiplier", "accuracy", "attack", "attack_rounds", "recovered_fraction",
    "seconds", "seed",
]  # fmt: skip
NOT_RESULT_FIELDS = {"threads", "client_cpus", "data_root", "download", "out", "force", "log_every"}


def run_name(cfg: config.FederatedConfig) -> str:
    """One filesystem-safe path component naming what changes the numbers most (config.json holds the rest)."""
    attack = f"{cfg.attack}-r{'.'.join(map(str, cfg.attack_rounds))}" if cfg.attack_rounds else "honest"
    if cfg.dmgan_client is not None:
        attack += f"-dmgan{cfg.dmgan_client}c{cfg.dmgan_class}"
    return utils.safe_name(
        f"{cfg.dataset}-{cfg.model}-{cfg.privacy.replace(':', '')}-k{cfg.clients}-a{cfg.alpha:g}-f{cfg.fraction:g}"
        f"-r{cfg.rounds}-e{cfg.local_epochs}-b{cfg.batch_size}-{attack}-s{cfg.seed}"
    )


def run_config(cfg: config.FederatedConfig) -> dict[str, Any]:
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {**fields, "run": run_name(cfg)}


def pad(images: torch.Tensor, labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An attack that rebuilds fewer images than the update carries (one batch of a client's many) is scored
    over all of them: the missing ones are mid-grey with label -1, so they count as not recovered."""
    missing = count - len(images)
    if missing <= 0:
        return images, labels
    grey = torch.full((missing, *images.shape[1:]), 0.5, dtype=images.dtype)
    return torch.cat([images, grey]), torch.cat([labels, torch.full((missing,), -1, dtype=labels.dtype)])


class Recorder:
    """The run directory and the evaluation side of one federated run (see the module docstring)."""

    def __init__(self, cfg: config.FederatedConfig):
        from federation import fedavg_noise, federated_data

        self.cfg, self.name = cfg, run_name(cfg)
        self.noise = fedavg_noise(cfg) if cfg.privacy_name == "dp-fedavg" else None  # DP-FedAvg's z
        self.dir = Path(cfg.out) / self.name
        self.split, self.parts = federated_data(cfg)
        self.finished = utils.run_is_done(self.dir) and not cfg.force
        self.history: list[dict[str, Any]] = []
        self.reports: dict[int, list[dict[str, Any]]] = {}
        self.attacks: list[dict[str, Any]] = []
        self.records: dict[int, tuple[RunRecord, torch.Tensor, torch.Tensor]] = {}
        self.attack_start: dict[int, float] = {}
        self.dmgan: list[dict[str, Any]] = []  # the DMGAN client's images' scores, per round it took part in
        self.judge = None  # evaluation.dmgan_judge, fit when the first images come
        self.start = time.perf_counter()
        self.bar = None

    def __enter__(self) -> Recorder:
        if not self.finished:
            utils.write_json(self.dir / "config.json", run_config(self.cfg))
            self.bar = tqdm(total=self.cfg.rounds, desc=self.name, unit="round", leave=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    # --- per round ---------------------------------------------------------------------------------------

    def client_reports(self, server_round: int, reports: list[dict[str, Any]]) -> None:
        self.reports[server_round] = reports

    @torch.no_grad()
    def evaluate(self, server_round: int, arrays: list, _config: dict) -> tuple[float, dict[str, float]]:
        """FedAvg's central evaluation after every round: the global model on the server's held-out split; one
        history row per round, history.csv rewritten each time."""
        from federation import build_model, load_arrays

        model = load_arrays(build_model(self.cfg, self.split), arrays).eval()
        logits = torch.cat([model(x) for x in self.split.x_test.split(256)])
        loss = float(F.cross_entropy(logits, self.split.y_test))
        accuracy = float((logits.argmax(1) == self.split.y_test).float().mean())
        reports = self.reports.get(server_round, [])
        client_eps = {int(r["partition-id"]): float(r["epsilon"]) for r in reports if "epsilon" in r}
        row = {
            "round": server_round, "test_accuracy": accuracy, "test_loss": loss, "epsilon": self.epsilon(server_round),
            "clients": len(reports), "client_epsilons": json.dumps(client_eps) if client_eps else "",
            "poisoning_detected": sum(bool(r.get("poisoning-detected")) for r in reports),
            "seconds": time.perf_counter() - self.start,
        }  # fmt: skip
        self.history.append(row)
        utils.write_csv(self.dir / "history.csv", self.history)
        self.score_dmgan(server_round)
        if server_round and self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(acc=f"{accuracy:.3f}", eps=f"{row['epsilon']:.2f}" if row["epsilon"] else "-")
        return loss, {"accuracy": accuracy}

    def epsilon(self, server_round: int) -> float | None:
        """ε spent after `server_round` rounds, by the accountant: dp-fedavg's for the whole training (rate
        --fraction, one step per round); dp-sgd's the largest any client reported (each its own accountant)."""
        if self.cfg.privacy_name == "dp-fedavg":
            from privacy import epsilon_spent

            return epsilon_spent(self.noise, self.cfg.fraction, server_round, self.cfg.delta, self.cfg.accountant)
        previous = [r["epsilon"] for r in self.history if r["epsilon"] is not None]
        eps = [float(r["epsilon"]) for r in self.reports.get(server_round, []) if "epsilon" in r]
        return max(eps + previous) if eps or previous else None

    def score_dmgan(self, server_round: int) -> None:
        """The DMGAN client's images of this round (if it took part and wrote them here), scored against the
        held-out split (evaluation.dmgan_judge: nearest real target image's SSIM, a held-out classifier's
        confidence in the target) into dmgan.csv."""
        path = self.dir / "dmgan" / f"round-{server_round}.npz"
        if self.cfg.dmgan_client is None or not path.exists():
            return
        from evaluation import dmgan_judge

        if self.judge is None:
            self.judge = dmgan_judge(self.split.x_test, self.split.y_test, self.cfg.dmgan_class)
        with np.load(path) as saved:
            ssim, confidence = self.judge(torch.as_tensor(saved["images"]))
        self.dmgan.append({"round": server_round, "nearest_target_ssim": ssim, "held_out_confidence": confidence})
        utils.write_csv(self.dir / "dmgan.csv", self.dmgan)

    # --- the attack's evaluation -------------------------------------------------------------------------

    def attack_config(self) -> config.AttackConfig:
        """The AttackConfig the attacks read (their settings at gradient mode's defaults)."""
        from leakage import default_iterations

        cfg = self.cfg
        iterations = cfg.attack_iterations or default_iterations(cfg.attack, self.split.input_shape)
        return dataclasses.replace(
            config.AttackConfig(), seed=cfg.seed, iterations=iterations, restarts=cfg.attack_restarts,
            log_every=cfg.log_every, success_ssim=cfg.success_ssim, batch_sizes=[cfg.trap_batch_size],
            poisoning_max_drop=cfg.poisoning_max_drop, cache_dir=Path(cfg.out) / "cache", threads=cfg.threads,
        )  # fmt: skip

    def private(self, server_round: int, targets: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples the targets' updates carry: each client's local schedule that round (all its samples for
        full epochs; the one batch a step cap leaves; all of them under DP-SGD's Poisson sampling)."""
        from federation import client_seed, local_batches

        indices = []
        for report in targets:
            share = self.parts[int(report["partition-id"])]
            if self.cfg.privacy_name == "dp-sgd":
                indices.append(share)
                continue
            seed = client_seed(self.cfg, server_round, int(report["partition-id"]))
            batches = local_batches(
                len(share), int(report["batch-size"]), int(report["local-epochs"]), int(report["max-steps"]), seed
            )
            indices.append(share[torch.cat(batches).unique()])
        chosen = torch.cat(indices)
        return self.split.x_train[chosen], self.split.y_train[chosen]

    def observer(self, server_round: int, targets: list[dict[str, Any]]) -> Observer:
        images, labels = self.private(server_round, targets)
        record = RunRecord()
        self.records[server_round] = record, images, labels
        self.attack_start[server_round] = time.perf_counter()
        observe = record.observer(images, labels, 0, 0)
        return lambda iteration, rec, guessed, loss: observe(iteration, *pad(rec, guessed, len(images)), loss)

    def score(
        self,
        server_round: int,
        targets: list[dict[str, Any]],
        rec: Reconstruction,
        sent: nn.Module,
        update: SharedUpdate,
    ) -> None:
        """Write the attack run: gradient mode's files and summary row, plus the round, the targets and the
        trapped client's poisoning check."""
        record, images, labels = self.records.pop(server_round)
        padded = pad(rec.images, rec.labels, len(images))
        features = rec.features
        if features is not None and len(features) < len(images):
            features = torch.cat([features, features.new_zeros(len(images) - len(features), *features.shape[1:])])
        record.add(
            dataclasses.replace(rec, images=padded[0], labels=padded[1], features=features), images, labels, 0, sent
        )
        record.seconds = time.perf_counter() - self.attack_start.pop(server_round, time.perf_counter())
        attack_cfg = self.attack_config()
        name = f"{self.name}-{self.cfg.attack}-r{server_round}"
        mechanism_name, _, strength = update.mechanism.partition(":")
        run_cfg = {
            "run": name, "victim": self.name, "model": self.cfg.model, "dataset": self.cfg.dataset,
            "attack": self.cfg.attack, "mechanism": update.mechanism, "mechanism_name": mechanism_name,
            "strength": float(strength) if strength else None, "batch_size": update.batch_size,
            "iterations": attack_cfg.iterations, "federated_run": self.name, "round": server_round,
            "clients": [int(t["partition-id"]) for t in targets], "local_steps": update.local_steps,
            "local_epochs": update.local_epochs, "num_samples": update.num_samples, "num_clients": update.num_clients,
            "lr": update.lr,
        }  # fmt: skip
        dp = self.cfg.privacy_name == "dp-sgd"
        privacy = {
            "epsilon": self.epsilon(server_round) if self.cfg.privacy_name.startswith("dp") else None,
            "release_epsilon": None, "noise_multiplier": update.noise_multiplier,
            "max_grad_norm": update.max_grad_norm, "sample_rate": float(targets[0]["sample-rate"]) if dp else None,
            "steps": update.local_steps if dp else None,
        }  # fmt: skip
        check = {
            k.replace("-", "_"): targets[0].get(k)
            for k in ("honest-accuracy", "received-accuracy", "poisoning-detected")
        }
        row = record.summary_row(attack_cfg, run_cfg, privacy) | check | {"round": server_round}
        attack_dir = self.dir / "attacks" / f"{self.cfg.attack}-r{server_round}"
        utils.write_json(attack_dir / "config.json", run_cfg)
        record.write(attack_dir, images, labels, row, {})
        self.attacks.append(row)

    # --- the end -----------------------------------------------------------------------------------------

    def finish(self) -> None:
        """metrics.json, last: the final global model's accuracy, the ε spent, and each attack's result."""
        last = self.history[-1]
        recovered = [a["recovered_fraction"] for a in self.attacks]
        metrics = {
            "run": self.name, "dataset": self.cfg.dataset, "model": self.cfg.model, "clients": self.cfg.clients,
            "alpha": self.cfg.alpha, "fraction": self.cfg.fraction, "rounds": self.cfg.rounds,
            "local_epochs": self.cfg.local_epochs, "batch_size": self.cfg.batch_size, "privacy": self.cfg.privacy,
            "epsilon": last["epsilon"], "delta": self.cfg.delta if self.cfg.privacy_name.startswith("dp") else None,
            "noise_multiplier": self.noise, "accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
            "attack": self.cfg.attack if self.attacks else None, "attack_rounds": self.cfg.attack_rounds,
            "recovered_fraction": max(recovered) if recovered else None,
            "attacks": [{k: a[k] for k in ("run", "round", "psnr", "ssim", "recovered_fraction")} for a in self.attacks],
            "dmgan": self.dmgan[-1] if self.dmgan else None,
            "seconds": time.perf_counter() - self.start, "seed": self.cfg.seed,
        }  # fmt: skip
        utils.write_json(self.dir / "metrics.json", metrics)


# --- the study -----------------------------------------------------------------------------------------------


def results_table(rows: list[dict[str, Any]]) -> str:
    header = ["run", "privacy", "ε", "clients", "α", "rounds", "accuracy", "attack", "recovered", "seconds"]
    cells = [
        [r["run"], r["privacy"], r["epsilon"], r["clients"], r["alpha"], r["rounds"], r["accuracy"], r["attack"],
         r["recovered_fraction"], r["seconds"]]
        for r in rows
    ]  # fmt: skip
    return utils.markdown_table(header, cells)


def simulate(cfg: config.FederatedConfig) -> None:
    """The run on Flower's simulation engine: K virtual SuperNodes, --client-cpus each (Ray), quiet logs."""
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.simulation import run_simulation

    from federation import make_client_app, make_server_app

    FLOWER_LOGGER.setLevel(logging.ERROR)  # not its per-round INFO lines, nor run_simulation's deprecation note
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: none hidden, no warning
    backend = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False},
    }
    run_simulation(make_server_app(cfg), make_client_app(cfg), num_supernodes=cfg.clients, backend_config=backend)


def run_study(cfg: config.FederatedConfig) -> None:
    """Check, run (unless finished), then rebuild the summaries from the run directories."""
    utils.check_output(cfg.out)
    run_dir = Path(cfg.out) / run_name(cfg)
    if utils.run_is_done(run_dir) and not cfg.force:
        utils.check_finished_run(
            run_dir, run_config(cfg), NOT_RESULT_FIELDS, utils.config_defaults(config.FederatedConfig)
        )
        print(f"{run_dir} already finished; skipped (--force redoes it).")
    else:
        from federation import check_attacks, federated_data

        check_attacks(cfg, *federated_data(cfg))  # a dataset that cannot load, or a bad attack, stops here
        with utils.study_lock(cfg.out):
            simulate(cfg)
        if not utils.run_is_done(run_dir):
            raise RuntimeError(f"the Flower run ended without finishing {run_dir}; see the log above.")
    rows = utils.write_summary(cfg.out, SUMMARY_COLUMNS, results_table)
    print(results_table([r for r in rows if r["run"] == run_name(cfg)]))
    print(f"{run_dir}/ holds the run; {Path(cfg.out) / 'summary.csv'} lists all {len(rows)} finished there.")
