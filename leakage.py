"""The leakage study that `uv run gradient_attack.py` runs: how much of a client's private batch can a server
rebuild from what the client shares, on the models the training study trained?

The victims are the finished training runs (their weights, images drawn from their own training split, and
their own privacy mode as the mechanism: a plain run shares its plain gradient and each gradient defense, a
DP-SGD run shares DP-SGD updates with its own noise multiplier and clip norm, a regularized run the gradient
of its regularized loss), or a freshly built model (--model/--dataset, and the LeNet demonstration when no
training run exists). The grid is victims x mechanisms x batch sizes x attacks; `auto` runs every honest attack
that applies and keeps per batch the reconstruction that best explains the shared update (by a measure the
server can compute, attacks.matching.matching_score). Each (victim, mechanism, batch size, attack) is one run
in runs/attack/<run>/ (config.json, trajectory.csv, snapshots.npz, reconstruction.png, metrics.json last);
summary.csv and summary.md are rebuilt from the finished run directories every time.

The client side (defenses.client_update) sees the private batch; the attacks see only the model and the
SharedUpdate; the scoring here (RunRecord) compares what they report with the originals afterwards.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import config
import parallel
import utils
from attacks import ATTACKS
from attacks.malicious import detect_poisoning, honest_training
from attacks.matching import matching_score
from data_sources import DataSplit, load_image_files
from defenses import ClientSetup, MechanismSpec, client_update, parse_mechanisms
from evaluation import RunRecord, finished_reconstructions
from models import FrozenBackbone
from prior_study import run_prior_study
from privacy import epsilon_spent, noise_multiplier_for, poisson_schedule, release_epsilon
from risk import release_bounds
from victims import Victim, victims

SUMMARY_COLUMNS = [
    "run", "victim", "model", "dataset", "attack", "mechanism", "mechanism_name", "strength", "epsilon",
    "release_epsilon", "noise_multiplier", "max_grad_norm", "batch_size", "num_images", "iterations", "restarts",
    "loss", "mse", "psnr", "ssim", "mse_std", "psnr_std", "ssim_std", "label_accuracy", "success_rate",
    "recovered_fraction", "feature_cosine", "seconds", "seed", "honest_accuracy", "received_accuracy",
    "poisoning_detected", "sample_rate", "steps", "trials", "success_low", "success_high",
]  # fmt: skip
DETECTION_COLUMNS = [
    "honest_accuracy",
    "received_accuracy",
    "poisoning_detected",
]  # the client's check of a malicious server's model (giavmp, rtf)
AUTO = "auto"


@dataclass
class PrivateData:
    """The private images (never handed to an attack) and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    source: dict[str, Any]  # indices or file names, recorded in config.json
    exclude: list[int]  # training-set indices other clients and auxiliary data must not use


def victim_mechanisms(cfg: config.AttackConfig, victim: Victim) -> list[MechanismSpec]:
    """--mechanisms for every victim if given; else what each victim shares: a plain run its plain gradient
    and each gradient defense, a DP-SGD run DP-SGD at its own target ε (which gives its own noise multiplier:
    the same accountant, sampling and steps), a regularized run its regularized gradient; the fresh
    demonstration victim the whole default grid."""
    if cfg.mechanisms:
        return parse_mechanisms(cfg.mechanisms)
    target = victim.training.get("target_epsilon")
    dp = f"dp-sgd:{target:g}" if target else "dp-sgd"
    own = {"none": ["none", *config.DEFAULT_DEFENSES], "dp-sgd": [dp], "regularized": ["regularized"]}
    return parse_mechanisms(own.get(victim.privacy, config.DEFAULT_MECHANISMS))


def auto_candidates(model: nn.Module, batch_sizes: list[int] | tuple[int, ...] = (1,)) -> list[str]:
    """The honest attacks `auto` runs on a victim: the FC readout everywhere; Inverting Gradients, made for
    ReLU networks, wherever the gradient reaches the pixels cheaply (a frozen backbone's head gives its
    features exactly, which the readout inverts, and optimising pixels through a 224-pixel backbone would
    take hours on a CPU); and iDLG's L-BFGS where the network is smooth (sigmoid or tanh activations, as in
    the DLG LeNet), the case it was made for: on ReLU networks it does not converge. For batches (some batch
    size above 1) the whole-batch readouts join: fc-peel on every model with a hidden FC layer to read, and
    the cocktail-party attack on fully connected ones (on a CNN it would add a second feature inversion for
    a batch that fc-peel reads better: bench/honest_bench.py)."""
    if isinstance(model, FrozenBackbone):
        return ["fc-readout"]
    smooth = any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in model.modules())
    batches = max(batch_sizes) > 1
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    whole = ["fc-peel"] + ([] if convolutional else ["cpa"]) if batches else []
    return ["fc-readout", *whole, "idlg", "ig"] if smooth else ["fc-readout", *whole, "ig"]


def victim_attacks(cfg: config.AttackConfig, victim: Victim) -> list[str]:
    """The attacks run on a victim, `auto` expanded into its candidates (which run first, in their own rows)."""
    candidates = auto_candidates(victim.model, cfg.batch_sizes)
    expanded = [a for name in cfg.attacks for a in (candidates if name == AUTO else [name])]
    return list(dict.fromkeys(expanded + ([AUTO] if AUTO in cfg.attacks else [])))


# --- the private data and the client's set-up --------------------------------------------------------------


def private_data(cfg: config.AttackConfig, split: DataSplit, count: int) -> PrivateData:
    """`count` private samples: the user's files, the given indices, or a seeded draw from the training set
    (a prefix of one permutation, so larger runs extend smaller ones)."""
    if cfg.images:
        images = load_image_files(cfg.images, split.input_shape)
        labels = torch.tensor(cfg.labels or [0] * len(images))
        bad = [y for y in labels.tolist() if not 0 <= y < split.num_classes]
        if bad:
            raise utils.UsageError(
                f"--labels {bad} out of range; the victim on '{split.name}' has classes 0..{split.num_classes - 1}"
                " (--num-classes sets them for a fresh victim on your images)."
            )
        kind = "grey" if split.input_shape[0] == 1 else "RGB"
        size = "x".join(map(str, split.input_shape[1:]))
        print(
            f"note: your {len(images)} image(s) are attacked as {kind} {size} images, the victim's input on '{split.name}'."
        )
        return PrivateData(images, labels, {"images": [str(p) for p in cfg.images]}, [])
    n = len(split.x_train)
    if cfg.indices:
        bad = [i for i in cfg.indices if not 0 <= i < n]
        if bad:
            raise utils.UsageError(f"--indices {bad} out of range; '{split.name}' has training indices 0..{n - 1}.")
        indices = list(cfg.indices)
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:count].tolist()
    return PrivateData(split.x_train[indices], split.y_train[indices], {"indices": indices}, indices)


def images_per_run(cfg: config.AttackConfig, batch_size: int, available: int) -> int:
    """Whole batches only: a drawn set grows to a multiple of the batch size; a fixed set must divide."""
    fixed = len(cfg.images) or len(cfg.indices)
    if fixed:
        if fixed % batch_size:
            raise utils.UsageError(
                f"batch size {batch_size} does not divide the {fixed} given images; give a multiple of it or drop it."
            )
        return fixed
    count = math.ceil(cfg.num_images / batch_size) * batch_size
    if count > available:
        raise utils.UsageError(
            f"batch size {batch_size} needs {count} images but the training set has {available}; use a smaller one."
        )
    return count


@dataclass(frozen=True)
class Privacy:
    """What a mechanism's DP-SGD guarantees: the training run's ε (with its subsampling) and the ε of the
    one release the server attacks (a Gaussian mechanism on a batch that certainly holds the target)."""

    epsilon: float | None = None
    release_epsilon: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None


def client_setup(victim: Victim, mech: MechanismSpec, num_train: int, seed: int) -> tuple[ClientSetup, Privacy]:
    """The set-up the client shares with: for dp-sgd:EPS the accountant's noise multiplier for ε = EPS under the
    training study's sampling (privacy.poisson_schedule, as Opacus sets it up), so larger ε means less noise; plain
    `dp-sgd`, or a DP run's own target ε, uses the noise multiplier that run recorded."""
    t = victim.training
    kappa = (t["lr"] * t["reg_sigma"]) ** 2
    base = ClientSetup(max_grad_norm=t["max_grad_norm"], lr=t["lr"], kappa=kappa, seed=seed)
    if mech.name != "dp-sgd":
        return base, Privacy()
    own = victim.noise_multiplier is not None and mech.strength in (None, victim.training.get("target_epsilon"))
    if own:  # the DP run's own budget: its recorded noise multiplier and ε
        z, epsilon = victim.noise_multiplier, victim.epsilon
    else:
        sample_rate, steps = poisson_schedule(num_train, t["batch_size"], t["epochs"])
        with warnings.catch_warnings():  # the search probes tiny multipliers, past RDP's alpha range: harmless
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            z = noise_multiplier_for(mech.strength, t["delta"], sample_rate, steps, t["accountant"])
        epsilon = epsilon_spent(z, sample_rate, steps, t["delta"], t["accountant"])
    privacy = Privacy(epsilon, release_epsilon(z, t["delta"]), z, t["max_grad_norm"])
    return dataclasses.replace(base, noise_multiplier=z), privacy


def check_mechanisms(
    mechanisms: list[MechanismSpec], victim: Victim, split: DataSplit, batch_sizes: list[int], excluded: int
) -> None:
    """What the mechanisms need from the victim and the data, checked before any run starts."""
    for mech in mechanisms:
        if mech.name == "secagg":
            needed, available = (int(mech.strength) - 1) * max(batch_sizes), len(split.x_train) - excluded
            if needed > available:
                raise utils.UsageError(
                    f"{mech.spec} at batch size {max(batch_sizes)} needs {needed} other clients' images but "
                    f"'{split.name}' has only {available} besides the victim's; use fewer clients or smaller batches."
                )
        if mech.name == "dp-sgd" and mech.strength is None and victim.noise_multiplier is None:
            raise utils.UsageError(
                f"mechanism 'dp-sgd' without an ε reuses a DP-SGD training run's noise, and {victim.name} is not one; "
                "give the budget instead, e.g. dp-sgd:8."
            )
        if mech.name == "dp-sgd" and victim.training["delta"] >= 1 / len(split.x_train):
            raise utils.UsageError(
                f"dp-sgd: δ = {victim.training['delta']} is not below 1/N for the {len(split.x_train)} training "
                f"samples of '{split.name}'; use a larger dataset."
            )


def other_clients(
    split: DataSplit, exclude: list[int], clients: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the other secure-aggregation clients: seeded, from the training set, never the victim's."""
    pool = torch.tensor(sorted(set(range(len(split.x_train))) - set(exclude)))
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    picks = pool[order[: (clients - 1) * batch_size]]
    return [(split.x_train[p], split.y_train[p]) for p in picks.view(clients - 1, batch_size)]


def aux_data(split: DataSplit, exclude: list[int]) -> DataSplit:
    """What a malicious server may learn from: the training split without the victim's images. The test split
    stays with the client, whose poisoning check runs on it."""
    keep = torch.tensor(sorted(set(range(len(split.x_train))) - set(exclude)), dtype=torch.long)
    empty = slice(0, 0)
    return dataclasses.replace(
        split, x_train=split.x_train[keep], y_train=split.y_train[keep], x_test=split.x_test[empty],
        y_test=split.y_test[empty],
    )  # fmt: skip


# --- the grid: one cell per victim, mechanism and batch size ---------------------------------------------------


@dataclass
class Cell:
    """One victim under one mechanism at one batch size: the client's updates, computed once per batch, and
    every attack run on them (a malicious server's attack gets a cell of its own: the client trains on the
    model that server sent)."""

    victim: Victim
    split: DataSplit
    dataset: str  # the victim's, or "user-images"
    mech: MechanismSpec
    batch_size: int
    data: PrivateData
    attacks: list[str]  # run in this order; `auto` last, choosing among `candidates`
    candidates: list[str]
    setup: ClientSetup  # how the client trains under this mechanism (DP noise found while planning)
    privacy: Privacy
    runs: dict[str, tuple[str, dict[str, Any]]]  # attack -> run name and config.json


def run_name(
    victim: Victim, dataset: str, attack: str, mech: MechanismSpec, batch_size: int, seed: int, local: str = ""
) -> str:
    """One filesystem-safe path component (a folder:PATH dataset's path becomes part of a name, not a path);
    `local` names a FedAvg client's local work (-e{epochs}x{batches})."""
    return utils.safe_name(
        f"{victim.name}-{dataset}-{attack}-{mech.spec.replace(':', '')}-b{batch_size}{local}-s{seed}"
    )


def default_iterations(attack: str, input_shape: tuple[int, ...]) -> int:
    """The attack's iterations per 1024 input values: a 32x32 colour photo has three times the unknowns of a
    32x32 digit and needs about three times the L-BFGS steps to pass 30 dB."""
    return ATTACKS[attack].default_iterations * math.ceil(math.prod(input_shape) / 1024)


def attack_settings(attack: str, candidates: list[str]) -> set[str]:
    """The config fields that bear on an attack's numbers beyond the common ones (auto: its candidates')."""
    return set().union(*(ATTACKS[a].settings for a in (candidates if attack == AUTO else [attack])))


# Config fields that do not change a run's numbers (the grid's lists name several runs, not this one; the
# victim's model and dataset are recorded as the run's own `model` and `dataset`).
NOT_RESULT_FIELDS = {"attacks", "mechanisms", "batch_sizes", "log_every", "threads", "device", "data_root", "download",
                     "out", "force", "cache_dir", "from_run", "train_runs"}  # fmt: skip


def run_config(cfg: config.AttackConfig, cell: Cell, attack: str, name: str) -> dict[str, Any]:
    """config.json: every AttackConfig field that bears on this attack, plus this run's own identity (the
    victim's architecture, dataset and input size as it was attacked)."""
    own = attack_settings(attack, cell.candidates)
    others = set().union(*(a.settings for a in ATTACKS.values())) - own
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items() if k not in others}
    fields["images"] = [str(p) for p in cfg.images]
    shape = cell.data.images.shape[1:]
    iterations = None if attack == AUTO else cfg.iterations or default_iterations(attack, shape)
    victim = cell.victim
    return {
        **fields, "run": name, "victim": victim.name, "model": victim.architecture, "dataset": cell.dataset,
        "image_size": victim.training["image_size"], "pretrained": victim.training.get("pretrained", True),
        "attack": attack, "candidates": cell.candidates if attack == AUTO else None, "mechanism": cell.mech.spec,
        "mechanism_name": cell.mech.name, "strength": cell.mech.strength, "batch_size": cell.batch_size,
        "iterations": iterations, "num_images": len(cell.data.images), **cell.data.source,
    }  # fmt: skip


def plan_victim(cfg: config.AttackConfig, victim: Victim, split: DataSplit) -> list[Cell]:
    """Every cell of one victim, each run checked: a finished run made with other settings stops the study
    here, before any attack runs."""
    dataset = "user-images" if cfg.images else victim.dataset
    counts = {b: images_per_run(cfg, b * cfg.local_batches, len(split.x_train)) for b in cfg.batch_sizes}
    data = private_data(cfg, split, max(counts.values()))
    mechanisms = victim_mechanisms(cfg, victim)
    check_mechanisms(mechanisms, victim, split, [b * cfg.local_batches for b in cfg.batch_sizes], len(data.exclude))
    attacks = victim_attacks(cfg, victim)
    for attack in attacks:
        if attack != AUTO and ATTACKS[attack].check:
            ATTACKS[attack].check(victim.model)
    candidates = auto_candidates(victim.model, cfg.batch_sizes) if AUTO in attacks else []
    local = f"-e{cfg.local_epochs}x{cfg.local_batches}" if cfg.local_epochs * cfg.local_batches > 1 else ""
    groups = [[a for a in attacks if a == AUTO or not ATTACKS[a].prepare]] + [
        [a] for a in attacks if a != AUTO and ATTACKS[a].prepare
    ]
    cells = []
    for mech in mechanisms:
        setup, privacy = client_setup(victim, mech, len(split.x_train), cfg.seed)  # a budget too small stops here
        for batch_size in cfg.batch_sizes:
            subset = PrivateData(data.images[: counts[batch_size]], data.labels[: counts[batch_size]],
                                 {k: v[: counts[batch_size]] for k, v in data.source.items()}, data.exclude)  # fmt: skip
            for group in filter(None, groups):
                cell = Cell(victim, split, dataset, mech, batch_size, subset, group, candidates, setup, privacy, {})
                for attack in group:
                    name = run_name(victim, dataset, attack, mech, batch_size, cfg.seed, local)
                    cell.runs[attack] = name, run_config(cfg, cell, attack, name)
                    if utils.run_is_done(cfg.out / name) and not cfg.force:
                        utils.check_finished_run(
                            cfg.out / name,
                            cell.runs[attack][1],
                            NOT_RESULT_FIELDS,
                            utils.config_defaults(config.AttackConfig),
                        )
                cells.append(cell)
    return cells


def served_model(cfg: config.AttackConfig, cell: Cell, cache: dict) -> tuple[nn.Module, dict[str, Any]]:
    """The model the client trains on in this cell, and the client's poisoning check of it: the victim's own,
    or the one a malicious server sent for this batch size (fitted once per victim and attack)."""
    attack = cell.attacks[0]
    if attack == AUTO or not ATTACKS[attack].prepare:
        return cell.victim.model, {}
    key = cell.victim.name, attack
    if key not in cache:  # a trained victim is the honest global model; a fresh one first gets a short training
        aux = aux_data(cell.split, cell.data.exclude)
        honest = cell.victim.model
        if cell.victim.privacy is None:
            honest = honest_training(honest, aux, cfg.honest_epochs, cfg.seed)
        cache[key] = ATTACKS[attack].prepare(honest, cell.split.input_shape, cell.split.num_classes, aux, cfg)
    served = cache[key]
    sent = served.sent[cell.batch_size]
    check = {}
    if len(cell.split.x_test):  # the client's check on its held-out split (photos have none)
        check = detect_poisoning(
            served.honest.cpu(), sent.cpu(), cell.split.x_test, cell.split.y_test, cfg.poisoning_max_drop
        )
    return sent, check


def attack_runner(cfg: config.AttackConfig, cell: Cell, attack: str, cache: dict) -> Callable[..., Any]:
    """The attack's run; one that learns a prior first (ggl's generator) learns it once per victim from the
    auxiliary data, the training split without the victims' images, as a malicious server's does."""
    if not ATTACKS[attack].learn:
        return ATTACKS[attack].run
    key = cell.victim.name, attack
    if key not in cache:
        cache[key] = ATTACKS[attack].learn(aux_data(cell.split, cell.data.exclude), cfg)
    return cache[key]


def run_cell(cfg: config.AttackConfig, cell: Cell, device: torch.device, servers: dict) -> None:
    """Every unfinished run of a cell. For each batch the client computes its update once; each attack runs
    on it (or, where its run finished earlier, its reconstructions are read back for `auto`), and `auto`
    keeps the candidate whose reconstruction explains the update best."""
    pending = [a for a in cell.attacks if cfg.force or not utils.run_is_done(cfg.out / cell.runs[a][0])]
    if not pending:
        return
    model, detection = served_model(cfg, cell, servers)
    model = model.to(device)
    records = {a: RunRecord() for a in pending}
    reused = {
        a: finished_reconstructions(cfg.out / cell.runs[a][0], cell.batch_size)
        for a in cell.candidates if AUTO in pending and a not in pending
    }  # fmt: skip
    chosen = []
    shape, classes = cell.split.input_shape, cell.split.num_classes
    held = cell.batch_size * cfg.local_batches  # a FedAvg client's images (gradient mode: one batch)
    for batch in range(len(cell.data.images) // held):
        part = slice(batch * held, (batch + 1) * held)
        originals, labels = cell.data.images[part], cell.data.labels[part]
        batch_setup = dataclasses.replace(cell.setup, seed=cfg.seed + batch)  # fresh noise for every batch
        clients = int(cell.mech.strength) if cell.mech.name == "secagg" else 1
        others = other_clients(cell.split, cell.data.exclude, clients, held, cfg.seed + batch) if clients > 1 else []
        to = lambda t: t.to(device)
        update = client_update(
            model, to(originals), to(labels), cell.mech, batch_setup, [(to(x), to(y)) for x, y in others],
            cfg.local_epochs, cell.batch_size,
        )  # fmt: skip
        recs = {a: reused[a][batch] for a in reused}
        for attack in (a for a in cell.attacks if a in records and a != AUTO):
            run = attack_runner(cfg, cell, attack, servers)  # a learned prior is offline work: off the clock
            record, start = records[attack], time.perf_counter()
            attack_cfg = dataclasses.replace(cfg, iterations=cell.runs[attack][1]["iterations"])
            observe = record.observer(originals, labels, batch, part.start)
            recs[attack] = run(model, update, shape, classes, attack_cfg, observe)
            record.seconds += time.perf_counter() - start
            record.add(recs[attack], originals, labels, part.start, model)
        if AUTO in records:
            start = time.perf_counter()
            scores = {a: matching_score(model, update, recs[a].images, recs[a].labels) for a in cell.candidates}
            best = min(scores, key=scores.get)
            rec = dataclasses.replace(recs[best], loss=scores[best])
            records[AUTO].observer(originals, labels, batch, part.start)(0, rec.images, rec.labels, rec.loss)
            records[AUTO].add(rec, originals, labels, part.start, model)
            records[AUTO].seconds += time.perf_counter() - start
            chosen.append({"batch": batch, "attack": best, "matching": scores})
    for attack, record in records.items():
        name, run_cfg = cell.runs[attack]
        utils.write_json(cfg.out / name / "config.json", run_cfg)
        extra = {}
        if attack == AUTO:  # it took as long as its candidates together, plus the choosing
            record.seconds += sum(
                records[a].seconds if a in records else _seconds(cfg.out / cell.runs[a][0]) for a in cell.candidates
            )
            extra = {"chosen": chosen}
        row = record.summary_row(cfg, run_cfg, dataclasses.asdict(cell.privacy)) | {
            k: detection.get(k) for k in DETECTION_COLUMNS
        }
        record.write(cfg.out / name, cell.data.images, cell.data.labels, row, extra)


def _seconds(run_dir: Path) -> float:
    return float(utils.read_json(run_dir / "metrics.json").get("seconds", 0.0))


# --- the study ---------------------------------------------------------------------------------------------


def results_table(rows: list[dict[str, Any]]) -> str:
    header = ["victim", "attack", "mechanism", "ε (run / release)", "batch", "PSNR (dB)", "SSIM", "label acc.",
              "success", "seconds"]  # fmt: skip
    return utils.markdown_table(header, [result_cells(r) for r in rows])


def result_cells(r: dict[str, Any]) -> list:
    """One row of the results table. A prior-aware row has no images: its success is the share of trials that
    picked the target, with its 95 % interval, beside the bound on any attack (release_bound)."""
    if r["attack"] == "prior-aware":
        success = (
            f"{r['success_rate']:.2f} ({r['success_low']:.2f}-{r['success_high']:.2f}), bound {r['release_bound']:.2f}"
        )
        return [r["victim"], r["attack"], r["mechanism"], f"{r['epsilon']:.2f} / --", "--", "--", "--", "--", success,
                r["seconds"]]  # fmt: skip
    eps = "--" if r["epsilon"] is None else f"{r['epsilon']:.2f} / {r['release_epsilon']:.2f}"
    return [r["victim"], r["attack"], r["mechanism"], eps, r["batch_size"], f"{r['psnr']:.1f} ± {r['psnr_std']:.1f}",
            f"{r['ssim']:.3f} ± {r['ssim_std']:.3f}", r["label_accuracy"], r["success_rate"], r["seconds"]]  # fmt: skip


def run_study(cfg: config.AttackConfig) -> None:
    """Plan every victim's cells (all checks first, DP noise included), run what is unfinished under a lock on
    the output directory, then rebuild the summaries from the run directories. `--attacks prior-aware` runs
    its own study of DP-SGD trainings instead (prior_study.py), into the same directory and summary."""
    utils.check_output(cfg.out)
    torch.set_num_threads(cfg.threads)
    cells = [] if cfg.attacks == ["prior-aware"] else plan_cells(cfg)  # every check before any output
    with utils.study_lock(cfg.out):
        names = set(run_prior_study(cfg)) if cfg.attacks == ["prior-aware"] else run_cells(cfg, cells)
        rows = utils.write_summary(cfg.out, SUMMARY_COLUMNS, results_table, lambda r: release_bounds(r, cfg.prior_size))
    print(results_table([r for r in rows if r["run"] in names]))
    print(
        f"{len(names)} runs in {cfg.out}/; {cfg.out / 'summary.csv'} and summary.md list all {len(rows)} finished there."
    )


def plan_cells(cfg: config.AttackConfig) -> list[Cell]:
    """Every victim's cells, planned with all their checks (DP noise included) before any run."""
    if cfg.images and not cfg.labels:
        print("note: --images without --labels: every file is labelled class 0.")
    return [cell for victim, split in victims(cfg) for cell in plan_victim(cfg, victim, split)]


def run_cells(cfg: config.AttackConfig, cells: list[Cell]) -> set[str]:
    """Run the unfinished cells, one after another or as Ray tasks (--workers, --ray-address); the names of all
    their runs. A malicious server's cells of one victim form one task, which fits the server's model once."""
    device = utils.pick_device(cfg.device)
    tasks: dict[Any, list[Cell]] = {}
    for i, cell in enumerate(cells):
        attack = cell.attacks[0]
        tasks.setdefault((cell.victim.name, attack) if attack != AUTO and ATTACKS[attack].prepare else i, []).append(
            cell
        )
    outcomes = parallel.run_tasks(
        attack_cells, (cfg, device), list(tasks.values()), workers=cfg.workers, address=cfg.ray_address,
        desc="leakage study",
    )  # fmt: skip
    lost = [c.runs[a][0] for task, out in zip(tasks.values(), outcomes, strict=True) if isinstance(out, Exception)
            for c in task for a in c.attacks]  # fmt: skip
    if lost:
        print(f"note: {len(lost)} run(s) were lost with their Ray worker ({', '.join(lost)}); the same command redoes "
              "them.", file=sys.stderr)  # fmt: skip
    return {name for cell in cells for name, _ in cell.runs.values()}


def attack_cells(shared: tuple[config.AttackConfig, torch.device], cells: list[Cell]) -> None:
    """One task of the study: its cells in order, sharing a malicious server's fitted model."""
    cfg, device = shared
    torch.set_num_threads(cfg.threads)  # a Ray worker starts with torch's own thread count
    servers: dict = {}
    for cell in cells:
        run_cell(cfg, cell, device, servers)
