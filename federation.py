"""The Flower apps of the federation: a ClientApp that trains locally on its Dirichlet share, and a ServerApp
whose strategy is FedAvg wrapped by a curious (or malicious) server.

The same two apps run on Flower's simulation engine (federated_runs.run_study) and on its deployment engine
(SuperLink + SuperNodes on many machines; `client_app` and `server_app` below, named in pyproject.toml's
[tool.flwr.app.components]). They read their settings from the command-line options in the run config key
`options` (the same options as `uv run federated.py`), or, in simulation, from the FederatedConfig handed in.

The server runs on Flower's compat strategy API (flwr.server.strategy) inside a LegacyContext workflow: in
flwr 1.42 SecAgg+ exists only there (SecAggPlusWorkflow with the client's secaggplus_mod), so every privacy
mode uses it and one curious strategy serves them all:

- none / dp-sgd: FedAvg weighted by the clients' sample counts; dp-sgd clients run Opacus inside `fit`;
- dp-fedavg: Flower's DifferentialPrivacyServerSideFixedClipping around FedAvg (clients weigh 1 each, as its
  noise calibration assumes a uniform average);
- secagg: SecAggPlusWorkflow; the clients weigh 1 each, so the unmasked result is the mean and K times it
  the sum of the round's updates: all the server ever sees.

The threat-model boundary: the curious strategy (CuriousServer) turns what the server received into a
`defenses.SharedUpdate` and hands it, with the model it sent, to the attack; the evaluation side (a
federated_runs.Recorder) scores what the attack observes against the client's data afterwards. A client's
data reaches no attack except through what its update carries.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import json
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import ArrayRecord, MetricRecord
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

import config
import utils
from attacks import ATTACKS, Reconstruction
from attacks.federated import ATTACKS as LOCAL_TRAINING_ATTACKS
from attacks.federated import dmgan_data, gan_attacker, generate
from attacks.malicious import ImprintBlock, Imprinted, detect_poisoning
from data_sources import DataOptions, DataSplit, dirichlet_partition, load_dataset
from defenses import SharedUpdate
from models import create_model

DMGAN_SHOWN = 32  # the DMGAN client's images scored per round
OPTIONS_KEY = "options"  # run-config key holding federated.py's command-line options (deployment engine)


# --- what both sides share: the data, the model, the client's local schedule ----------------------------


def settings(context: Any) -> config.FederatedConfig:
    """The FederatedConfig of a deployed run: federated.py's options from the run config (validated alike)."""
    return config.parse(config.FederatedConfig, shlex.split(str(context.run_config.get(OPTIONS_KEY, ""))))


def federated_data(cfg: config.FederatedConfig) -> tuple[DataSplit, list[torch.Tensor]]:
    """The dataset split and every client's training indices (Dirichlet shares): each process computes the
    same ones from the seed, so a SuperNode needs nothing but its partition id."""
    return _federated_data(
        cfg.dataset, str(cfg.data_root), cfg.download, cfg.seed, cfg.test_fraction, cfg.image_size, cfg.clients,
        cfg.alpha,
    )  # fmt: skip


@functools.lru_cache(maxsize=2)
def _federated_data(dataset, root, download, seed, test_fraction, image_size, clients, alpha):
    split = load_dataset(dataset, DataOptions(root, download, seed, test_fraction, image_size))
    return split, dirichlet_partition(split.y_train, clients, alpha, seed)


def build_model(cfg: config.FederatedConfig, split: DataSplit, imprint: str = "") -> nn.Module:
    """The global model's architecture (seeded initial weights), with DMGAN's extra 'fake' class when a client
    plays it (the malicious client joins a federation whose model has it, as in Hitaj et al.); `imprint` (JSON bin
    groups) puts an RtF imprint block in front, as a malicious server's app tells its clients to (the server
    ships the app's code)."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, split.input_shape, split.num_classes + (cfg.dmgan_client is not None))
    if imprint:
        groups, size = json.loads(imprint), math.prod(split.input_shape)
        model = Imprinted(ImprintBlock(torch.zeros(sum(groups), size), torch.zeros(sum(groups)), 0.0, groups), model)
    return model


def to_arrays(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def load_arrays(model: nn.Module, arrays: list[np.ndarray]) -> nn.Module:
    keys = list(model.state_dict())
    model.load_state_dict({k: torch.as_tensor(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})
    return model


def check_attacks(cfg: config.FederatedConfig, split: DataSplit, parts: list[torch.Tensor]) -> None:
    """What the options ask of the data, checked before any round: DMGAN's class exists, and under secagg the
    attacks that simulate the clients' local training (ig-weight, ig-multi, dlf) get clients of equal shares, the
    only sum they can model (every simulated client trains on as many samples)."""
    if cfg.dmgan_client is not None and cfg.dmgan_class >= split.num_classes:
        raise utils.UsageError(
            f"--dmgan-class {cfg.dmgan_class} is not a class of {cfg.dataset} (0..{split.num_classes - 1})."
        )
    sizes = sorted({len(p) for p in parts})
    if cfg.privacy_name == "secagg" and cfg.attack in LOCAL_TRAINING_ATTACKS and cfg.attack_rounds and len(sizes) > 1:
        raise utils.UsageError(
            f"--attack {cfg.attack} under --privacy secagg models the round's sum as clients of equal shares, but "
            f"the Dirichlet shares here hold {sizes[0]} to {sizes[-1]} samples. Use a gradient-mode attack (e.g. "
            "ig, which reads the sum as one gradient), or attack without secagg."
        )


def client_seed(cfg: config.FederatedConfig, server_round: int, partition: int) -> int:
    """One seed per client and round: its batches and its DP noise."""
    return (cfg.seed * 1_000_003 + server_round * 100_003 + partition) % 2**62


def local_batches(num_samples: int, batch_size: int, epochs: int, max_steps: int, seed: int) -> list[torch.Tensor]:
    """The client's plain-SGD schedule: `epochs` seeded shuffles in batches, cut after `max_steps` (0: none).
    The evaluation recomputes it to know which samples a round's update carries."""
    gen = torch.Generator().manual_seed(seed)
    batches = [b for _ in range(epochs) for b in torch.randperm(num_samples, generator=gen).split(batch_size)]
    return batches[:max_steps] if max_steps else batches


def client_noise(cfg: config.FederatedConfig, num_samples: int) -> tuple[float, float, int]:
    """dp-sgd: the noise multiplier a client of `num_samples` uses so that R rounds of E epochs of Poisson-
    sampled DP-SGD (the rate Opacus sets, B/n) spend at most its ε, by the accountant; its rate and steps per
    round. It assumes the client takes part in every round, so a sampled-out round only saves budget."""
    from privacy import noise_multiplier_for, poisson_schedule

    rate, steps = poisson_schedule(num_samples, cfg.batch_size, cfg.local_epochs)
    z = noise_multiplier_for(cfg.privacy_epsilon, cfg.delta, rate, steps * cfg.rounds, cfg.accountant)
    return z, rate, steps


def fedavg_noise(cfg: config.FederatedConfig) -> float:
    """dp-fedavg: the noise multiplier for the whole training's ε at sampling rate --fraction over R rounds,
    by the accountant (one client's update is the unit; Flower's wrapper adds z * C / m to the mean of m)."""
    from privacy import noise_multiplier_for

    return noise_multiplier_for(cfg.privacy_epsilon, cfg.delta, cfg.fraction, cfg.rounds, cfg.accountant)


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list[torch.Tensor], lr: float) -> None:
    """Plain SGD over the scheduled batches: the update is lr times the sum of the batch gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()


def train_dp_sgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: config.FederatedConfig, lr: float, z: float, seed: int
) -> int:
    """E epochs of DP-SGD through Opacus (as Flower's Opacus example: the engine wraps the client's ordinary
    loop); returns the steps taken."""
    from privacy import make_private
    from training import make_loader

    model.train()
    loader = make_loader(x, y, cfg.batch_size, seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    _, module, optimizer, criterion, loader = make_private(
        model, optimizer, loader, noise_multiplier=z, max_grad_norm=cfg.max_grad_norm, accountant=cfg.accountant,
        seed=seed,
    )  # fmt: skip
    steps = 0
    for _ in range(cfg.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            if len(yb):
                criterion(module(xb), yb).backward()
            optimizer.step()
            steps += 1
    return steps


# --- the client -----------------------------------------------------------------------------------------


def fit_client(
    cfg: config.FederatedConfig, partition: int, parameters: list[np.ndarray], ins: dict[str, Any], state: Any
) -> tuple[list[np.ndarray], int, dict[str, Any]]:
    """One round of a client: load what the server sent (and the architecture its app names), check it against
    the last honest model received (the accuracy check of gradient mode, on the client's own data), train
    locally as the server's round config says (epochs, batch size, lr, and a step cap a server may set), and
    return the new weights, the aggregation weight and what the client reports."""
    torch.set_num_threads(cfg.threads)
    split, parts = federated_data(cfg)
    x, y = split.x_train[parts[partition]], split.y_train[parts[partition]]
    imprint = str(ins.get("imprint", ""))
    model = load_arrays(build_model(cfg, split, imprint), parameters)
    metrics: dict[str, Any] = {"partition-id": partition, "num-samples": len(y)}
    if "last-global" in state:  # the client's poisoning check
        previous = load_arrays(build_model(cfg, split), state["last-global"].to_numpy_ndarrays())
        check = detect_poisoning(previous.eval(), model.eval(), x, y, cfg.poisoning_max_drop)
        metrics.update({k.replace("_", "-"): v for k, v in check.items()})
    if not imprint and not metrics.get("poisoning-detected"):
        state["last-global"] = ArrayRecord.from_numpy_ndarrays(parameters)
    server_round, lr = int(ins["round"]), float(ins["lr"])
    batch_size, epochs, max_steps = int(ins["batch-size"]), int(ins["local-epochs"]), int(ins["max-steps"])
    seed = client_seed(cfg, server_round, partition)
    if partition == cfg.dmgan_client:
        x, y = dmgan_turn(cfg, model, x, y, server_round, state)
    if cfg.privacy_name == "dp-sgd":  # its own plan (B, E), whatever the server asks: it fixes the client's ε
        from privacy import epsilon_spent

        batch_size, epochs, max_steps = cfg.batch_size, cfg.local_epochs, 0
        z, rate, _ = client_noise(cfg, len(y))
        steps = train_dp_sgd(model, x, y, cfg, lr, z, seed)
        spent = state["dp-sgd"]["steps"] + steps if "dp-sgd" in state else steps
        state["dp-sgd"] = MetricRecord({"steps": spent})
        eps = epsilon_spent(z, rate, spent, cfg.delta, cfg.accountant)
        metrics.update({"epsilon": eps, "noise-multiplier": z, "sample-rate": rate})
    else:
        batches = local_batches(len(y), batch_size, epochs, max_steps, seed)
        train_plain(model, x, y, batches, lr)
        steps = len(batches)
    metrics.update({"steps": steps, "batch-size": batch_size, "local-epochs": epochs, "max-steps": max_steps, "lr": lr})
    weight = len(y) if cfg.privacy_name in ("none", "dp-sgd") else 1  # dp-fedavg and secagg: a uniform mean
    return to_arrays(model), weight, metrics


def dmgan_turn(
    cfg: config.FederatedConfig, model: nn.Module, x: torch.Tensor, y: torch.Tensor, server_round: int, state: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """The DMGAN client's turn (attacks.federated.dmgan_data): without its samples of --dmgan-class, it trains
    its generator (kept in the client's state between rounds) against the global model received, and returns
    the data it trains on this round: its own plus generated images labelled 'fake'. The images its generator
    now draws (fixed latent draws) go to <run>/dmgan/round-<r>.npz, the attacker's output that the evaluation
    scores (federated_runs.Recorder); on the deployment engine they stay on the client's machine."""
    from federated_runs import run_name

    split, _ = federated_data(cfg)
    attacker = gan_attacker(split.input_shape, cfg.dmgan_class, split.num_classes, seed=cfg.seed)
    if "dmgan-generator" in state:
        load_arrays(attacker.generator, state["dmgan-generator"].to_numpy_ndarrays())
        attacker.rounds = int(state["dmgan-rounds"]["rounds"])
    keep = y != cfg.dmgan_class
    x, y = dmgan_data(attacker, model, x[keep], y[keep])
    state["dmgan-generator"] = ArrayRecord.from_numpy_ndarrays(to_arrays(attacker.generator))
    state["dmgan-rounds"] = MetricRecord({"rounds": attacker.rounds})
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=generate(attacker, DMGAN_SHOWN, seed=cfg.seed).numpy())
    utils.atomic_write_bytes(Path(cfg.out) / run_name(cfg) / "dmgan" / f"round-{server_round}.npz", buffer.getvalue())
    return x, y


def make_client_app(cfg: config.FederatedConfig | None = None):
    """The ClientApp: a NumPyClient around fit_client, with Flower's secaggplus_mod when the run asks for
    SecAgg+. `cfg` None: read it from the run config (deployment)."""

    class Client(NumPyClient):
        def __init__(self, context):
            self.context = context

        def fit(self, parameters, ins):
            run_cfg = cfg or settings(self.context)
            partition = int(self.context.node_config["partition-id"])
            return fit_client(run_cfg, partition, parameters, ins, self.context.state)

    def maybe_secagg(msg, context, call_next):
        run_cfg = cfg or settings(context)
        return secaggplus_mod(msg, context, call_next) if run_cfg.privacy_name == "secagg" else call_next(msg, context)

    return ClientApp(client_fn=lambda context: Client(context).to_client(), mods=[maybe_secagg])


# --- the server -----------------------------------------------------------------------------------------


def round_config(cfg: config.FederatedConfig, server_round: int) -> dict[str, Any]:
    """What the server tells every client to do this round (a malicious server changes it for its target)."""
    return {
        "round": server_round, "lr": cfg.lr, "batch-size": cfg.batch_size, "local-epochs": cfg.local_epochs,
        "max-steps": 0, "imprint": "",
    }  # fmt: skip


def shared_update(
    cfg: config.FederatedConfig, sent: nn.Module, returned: list[np.ndarray], reports: list[dict[str, Any]], scale: int
) -> SharedUpdate:
    """What the server received, as the attacks take it: (sent - returned) / lr for each trainable parameter
    (in model.parameters() order), `scale` times (secagg: the mean of K uniform updates is a K-th of the sum),
    with what the server knows of the local work from the protocol and the clients' reports."""
    after = load_arrays(copy.deepcopy(sent), returned)
    names = [n for n, p in sent.named_parameters() if p.requires_grad]
    before, later = dict(sent.named_parameters()), dict(after.named_parameters())
    lr = float(reports[0]["lr"])  # the round's, as the server asked it
    gradients = tuple((before[n].detach().double() - later[n].detach().double()).float() * scale / lr for n in names)
    first = reports[0]
    dp = cfg.privacy_name == "dp-sgd"
    return SharedUpdate(
        gradients=gradients,
        batch_size=int(first["batch-size"]),
        lr=lr,
        local_steps=max(int(r["steps"]) for r in reports),
        local_epochs=int(first["local-epochs"]),
        num_samples=int(first["num-samples"]),  # each client's: under secagg all equal (check_attacks)
        num_clients=len(reports) if cfg.privacy_name == "secagg" else 1,
        mechanism=f"secagg:{len(reports)}" if cfg.privacy_name == "secagg" else cfg.privacy,
        max_grad_norm=cfg.max_grad_norm if dp else None,
        noise_multiplier=float(first["noise-multiplier"]) if dp else None,
    )


class CuriousServer(Strategy):
    """FedAvg (or its DP wrapper) as Flower runs it, with a server that, at the attack rounds, hands a client's
    update to an attack: the sampled client holding the fewest samples (the easiest target), or under secagg
    the round's sum. A malicious attack (one with `prepare`) first sends its trap model to the client that
    reported the most samples (a full batch), with one local step at --trap-batch-size and --trap-lr (the
    server sets the round's work), and leaves that update out of FedAvg.

    `recorder` is the evaluation side: it gives the attack its `observe` callback and scores what it returns;
    the attack itself gets only the model the server sent and the SharedUpdate."""

    def __init__(self, inner: Strategy, cfg: config.FederatedConfig, split: DataSplit, recorder):
        self.inner, self.cfg, self.recorder = inner, cfg, recorder
        self.shape, self.classes, self.aux = split.input_shape, split.num_classes, server_data(split)
        self.sent: dict[int, tuple[str | None, nn.Module]] = {}  # round -> (trapped client, model sent to it)
        self.template = build_model(cfg, split)
        self.sizes: dict[str, int] = {}  # each client's sample count, as it reported it

    def initialize_parameters(self, client_manager):
        return self.inner.initialize_parameters(client_manager)

    def evaluate(self, server_round, parameters):
        return self.inner.evaluate(server_round, parameters)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def attacking(self, server_round: int) -> bool:
        return server_round in self.cfg.attack_rounds

    def configure_fit(self, server_round, parameters, client_manager):
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        honest = load_arrays(copy.deepcopy(self.template), parameters_to_ndarrays(parameters))
        self.sent[server_round] = (None, honest)
        attack = ATTACKS[self.cfg.attack]
        if not (self.attacking(server_round) and attack.prepare):
            return instructions
        # the target: the client that reported the most samples so far, so that its batch is full
        instructions = sorted(instructions, key=lambda pair: (-self.sizes.get(str(pair[0].cid), 0), str(pair[0].cid)))
        proxy, ins = instructions[0]
        attack_cfg = self.recorder.attack_config()
        trap = attack.prepare(honest, self.shape, self.classes, self.aux, attack_cfg).sent[self.cfg.trap_batch_size]
        imprint = json.dumps(trap.imprint.groups) if isinstance(trap, Imprinted) else ""
        trap_ins = {"batch-size": self.cfg.trap_batch_size, "local-epochs": 1, "max-steps": 1, "imprint": imprint,
                    "lr": self.cfg.trap_lr}  # fmt: skip
        self.sent[server_round] = (str(proxy.cid), trap)
        return [(proxy, FitIns(ndarrays_to_parameters(to_arrays(trap)), {**ins.config, **trap_ins}))] + instructions[1:]

    def aggregate_fit(self, server_round, results, failures):
        reports = [dict(res.metrics) for _, res in results]
        self.sizes.update({str(proxy.cid): int(res.metrics["num-samples"]) for proxy, res in results})
        self.recorder.client_reports(server_round, reports)
        trapped, sent = self.sent.pop(server_round, (None, None))
        if self.attacking(server_round) and results:
            if trapped is not None:
                chosen = [(p, r) for p, r in results if str(p.cid) == trapped]
                results = [(p, r) for p, r in results if str(p.cid) != trapped]
            elif self.cfg.privacy_name == "secagg":
                chosen = results  # each carries the unmasked mean, and nothing of its own
            else:
                chosen = [min(results, key=lambda pr: (pr[1].metrics["num-samples"], pr[1].metrics["partition-id"]))]
            if chosen:
                targets = [dict(r.metrics) for _, r in chosen]
                scale = len(chosen) if self.cfg.privacy_name == "secagg" else 1
                update = shared_update(self.cfg, sent, parameters_to_ndarrays(chosen[0][1].parameters), targets, scale)
                self.attack(server_round, sent, update, targets)
        return self.inner.aggregate_fit(server_round, results, failures)

    def attack(self, server_round: int, sent: nn.Module, update: SharedUpdate, targets: list[dict[str, Any]]) -> None:
        """The server's attack on one update: the model it sent and the SharedUpdate, nothing else."""
        attack_cfg = self.recorder.attack_config()
        observe = self.recorder.observer(server_round, targets)
        reconstruction: Reconstruction = ATTACKS[self.cfg.attack].run(
            sent, update, self.shape, self.classes, attack_cfg, observe
        )
        self.recorder.score(server_round, targets, reconstruction, sent, update)


def server_data(split: DataSplit) -> DataSplit:
    """The server's own data: the held-out split, on which it measures the global model and from which a
    malicious server fits its trap (never a client's share)."""
    return dataclasses.replace(split, x_train=split.x_test, y_train=split.y_test)


def make_strategy(cfg: config.FederatedConfig, split: DataSplit, recorder):
    """FedAvg over the sampled clients with the server's central evaluation, wrapped by Flower's server-side
    DP clipping for dp-fedavg, and by the curious server outermost (it sees the raw updates, as the server
    does before it clips them)."""
    template = build_model(cfg, split)
    sampled = cfg.sampled_clients
    strategy = FedAvg(
        fraction_fit=cfg.fraction, fraction_evaluate=0.0, min_fit_clients=sampled, min_evaluate_clients=0,
        min_available_clients=cfg.clients, evaluate_fn=recorder.evaluate, accept_failures=False,
        on_fit_config_fn=lambda server_round: round_config(cfg, server_round),
        initial_parameters=ndarrays_to_parameters(to_arrays(template)),
        fit_metrics_aggregation_fn=lambda metrics: {},
    )  # fmt: skip
    if cfg.privacy_name == "dp-fedavg":
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, fedavg_noise(cfg), cfg.clipping_norm, sampled)
    return CuriousServer(strategy, cfg, split, recorder)


def make_server_app(cfg: config.FederatedConfig | None = None):
    """The ServerApp: the strategy in Flower's default workflow, with SecAggPlusWorkflow as its fit step under
    secagg (every sampled client shares its key with all others; any two-thirds reconstruct a dropout)."""
    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        from federated_runs import Recorder

        run_cfg = cfg or settings(context)
        split, parts = federated_data(run_cfg)
        check_attacks(run_cfg, split, parts)
        with Recorder(run_cfg) as recorder:
            if recorder.finished:
                return
            strategy = make_strategy(run_cfg, split, recorder)
            legacy = LegacyContext(context, config=ServerConfig(num_rounds=run_cfg.rounds), strategy=strategy)
            secagg = run_cfg.privacy_name == "secagg"
            # the clients weigh 1 each: Flower's default max_weight (1000) would scale every update by 1/1000
            # before quantizing it to 2^22 levels, and the sum would lose three digits
            fit = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=2 / 3, max_weight=1.0) if secagg else None
            DefaultWorkflow(fit_workflow=fit)(grid, legacy)
            recorder.finish()

    return app


client_app = make_client_app()
server_app = make_server_app()
