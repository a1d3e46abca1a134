"""The training study that `uv run train.py` runs: every model of TrainConfig under every privacy mode on one
dataset.

Each run writes runs/train/<run>/ (config.json, history.csv, model.safetensors, metrics.json last); summary.csv
and summary.md are rebuilt from the finished run directories, and the study ends with the benchmark table
(results.benchmark_table, the same one analysis.py puts in the report). The loop is an ordinary PyTorch loop;
DP-SGD is a thin Opacus layer over it (privacy.make_private), and a frozen backbone's head trains on features
computed once per split (the feature cache), unless --finetune full trains the backbone too.

Past one process (parallel.py): under torchrun every run is trained by all the processes together (Opacus'
distributed DP-SGD, torch DDP for the other modes) and rank 0 writes; with --workers or --ray-address the
study's runs are Ray tasks, each writing its own directory as a serial study would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

import config
import parallel
import utils
from audit import GradientCanaries
from data_sources import DataOptions, DataSplit, load_dataset
from metrics import classification_metrics
from models import (
    PRETRAINED,
    FrozenBackbone,
    compute_features,
    create_model,
    save_checkpoint,
    trainable_module,
)
from parallel import ProcessGroup
from privacy import (
    WeightNoiseRegularizer,
    choose_grad_sample_mode,
    make_private,
    noise_multiplier_for,
    poisson_schedule,
)
from results import benchmark_table
from risk import run_bounds

SUMMARY_COLUMNS = [
    "run", "dataset", "model", "privacy", "target_epsilon", "epsilon", "delta", "noise_multiplier",
    "max_grad_norm", "sample_rate", "steps", "epochs", "accuracy", "precision", "recall", "specificity",
    "f1", "mcc", "train_seconds", "samples_per_second", "seed", "pretrained", "audit_canaries", "audit_epsilon",
    "audit_guesses", "audit_correct", "audit_fdp_epsilon", "audit_fdp_noise_multiplier", "audit_seconds",
]  # fmt: skip
# Opacus' advice for production runs and a PyTorch note on its backward hooks: noise, not news, on every run.
warnings.filterwarnings("ignore", message="Secure RNG turned off")
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
warnings.filterwarnings("ignore", message="Full backward hook is firing")
# Config fields that do not change a run's numbers: a finished run with other values here is still valid.
NOT_RESULT_FIELDS = {
    "models",
    "epsilons",
    "out",
    "force",
    "device",
    "threads",
    "download",
    "data_root",
    "feature_cache",
    "prior_size",
    "grad_sample_mode",  # Opacus' engines compute the same clipped, noised step (up to float rounding)
    "workers",
    "ray_address",
}


class Diverged(Exception):
    """Training produced a non-finite loss: the run is recorded as failed, never as finished."""


@dataclass
class Run:
    """One cell of the study grid."""

    name: str
    model: str
    privacy: str  # none | dp-sgd | regularized
    target_epsilon: float | None = None
    noise_multiplier: float | None = None  # dp-sgd: the accountant's z for the target, found before any run
    grad_sample_mode: str = "hooks"  # dp-sgd: the Opacus engine that computes the per-sample gradients


def study_runs(cfg: config.TrainConfig, dataset: str, num_train: int) -> list[Run]:
    """The grid models x privacy modes (x ε for dp-sgd), in the order the table shows them. Run names carry
    the seed, and `-random` for a backbone built without its pretrained weights, so no two settings share a
    directory, and `-full` for a backbone fine-tuned end to end. Every DP-SGD run's noise multiplier is found
    here, so a budget no noise reaches stops the study before the first run trains."""
    rate, steps = poisson_schedule(num_train, cfg.batch_size, cfg.epochs)
    runs = []
    for model in cfg.models:
        random, full = model in PRETRAINED and not cfg.pretrained, model in PRETRAINED and cfg.finetune == "full"
        stem = utils.safe_name(f"{dataset}-{model}" + ("-random" if random else "") + ("-full" if full else ""))
        for mode in cfg.privacy:
            if mode != "dp-sgd":
                runs.append(Run(f"{stem}-{mode}-s{cfg.seed}", model, mode))
                continue
            for eps in cfg.epsilons:
                z = noise_multiplier_for(eps, cfg.delta, rate, steps, cfg.accountant)
                runs.append(Run(f"{stem}-dp-sgd-eps{eps:g}-s{cfg.seed}", model, mode, eps, z))
    return runs


def run_config(cfg: config.TrainConfig, run: Run) -> dict[str, Any]:
    """config.json: every TrainConfig field, with this run's own model, privacy and target ε."""
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    return {**fields, "run": run.name, "model": run.model, "privacy": run.privacy, "target_epsilon": run.target_epsilon}


def make_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    group: ProcessGroup = parallel.ONE_PROCESS,
    dp: bool = False,
) -> DataLoader:
    """Shuffled batches from a seeded generator: same seed, same batches (Opacus keeps the generator when it
    swaps in Poisson sampling). Under DP-SGD in several processes this is still the whole set at the whole
    batch size, from which Opacus' distributed Poisson sampler takes each process's share at the same rate
    (rank r draws with seed + r, so no two processes draw alike); otherwise each process gets its slice of
    every epoch (DistributedSampler) and its share of the batch."""
    dataset = TensorDataset(x, y)
    if dp or not group.distributed:
        generator = torch.Generator().manual_seed(seed + group.rank)
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    sampler = DistributedSampler(dataset, group.world_size, group.rank, shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=max(1, round(batch_size / group.world_size)), sampler=sampler)


@torch.no_grad()
def predict(
    module: nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Predicted labels of the whole split, in batches, in eval mode."""
    module.eval()
    preds = [module(prepare(x[i : i + 256].to(device))).argmax(1).cpu() for i in range(0, len(x), 256)]
    return torch.cat(preds)


def fit(
    cfg: config.TrainConfig,
    run: Run,
    module: nn.Module,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    data: DataSplit,
    device: torch.device,
    history_path: Path,
    group: ProcessGroup = parallel.ONE_PROCESS,
) -> dict[str, Any]:
    """Train `module` on prepare(x) for cfg.epochs under run.privacy and return its metrics; the per-epoch
    history is rewritten to history_path after every epoch (by the main process), so an interrupted run shows
    how far it got.

    `prepare` is the identity for ordinary models and cached features, or the frozen backbone's feature
    extractor in the naive head-only loop: only the trainable module is optimised (and, under DP, wrapped).
    `data` holds what prepare takes (images, or features from the cache). In a torchrun job every process
    calls fit with the same arguments and trains its share of each batch; the history and metrics count
    the samples of all processes.
    """
    utils.seed_everything(cfg.seed)
    module.to(device).train()  # Opacus only wraps a module in training mode
    optimizer = torch.optim.SGD(module.parameters(), lr=cfg.lr, momentum=0.9)
    loader = make_loader(data.x_train, data.y_train, cfg.batch_size, cfg.seed, group, run.privacy == "dp-sgd")
    engine, regularizer, criterion = None, None, nn.CrossEntropyLoss()
    if run.privacy == "dp-sgd":
        engine, module, optimizer, criterion, loader = make_private(
            module, optimizer, loader, noise_multiplier=run.noise_multiplier, max_grad_norm=cfg.max_grad_norm,
            accountant=cfg.accountant, seed=cfg.seed, grad_sample_mode=run.grad_sample_mode,
        )  # fmt: skip
    elif run.privacy == "regularized":
        regularizer = WeightNoiseRegularizer(module, kappa=(cfg.lr * cfg.reg_sigma) ** 2)
    if group.distributed and not engine:
        module = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    epsilon = (lambda: engine.get_epsilon(cfg.delta)) if engine else (lambda: None)
    canaries = None
    if cfg.audit_canaries:  # drawn like examples: at Opacus' Poisson rate, or at the plain batches' rate
        rate = loader.sample_rate if engine else min(1.0, cfg.batch_size / len(data.x_train))
        params = [p for p in module.parameters() if p.requires_grad]
        z = optimizer.noise_multiplier if engine else 0.0
        canaries = GradientCanaries(params, cfg.audit_canaries, cfg.max_grad_norm, rate, z, cfg.seed + 1)
        if engine:
            canaries.attach(optimizer)

    history, steps, samples, train_seconds = [], 0, 0, 0.0
    bar = tqdm(
        range(1, cfg.epochs + 1), desc=run.name, unit="epoch", leave=False, disable=not parallel.shows_progress(group)
    )
    try:
        for epoch in bar:
            module.train()
            if isinstance(loader.sampler, DistributedSampler):
                loader.sampler.set_epoch(epoch)
            start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            for x, y in loader:
                x, y = prepare(x.to(device)), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                logits = module(x)
                loss = criterion(logits, y)  # ghost clipping's loss runs both its backward passes
                objective = (loss + regularizer.penalty()) if regularizer else loss
                if len(y) and not math.isfinite(objective.item()):
                    raise Diverged(f"the training loss became {objective.item()} in epoch {epoch}, step {steps + 1}")
                objective.backward()
                if canaries and not engine:
                    canaries.plain_step(params, max(len(y), 1))
                optimizer.step()
                steps += 1
                if len(y):  # Poisson sampling can draw an empty batch: a step, but nothing to log
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += len(y)
            train_seconds += time.perf_counter() - start
            optimizer.zero_grad(set_to_none=True)  # expanded weights refuse to predict while holding per-sample grads
            loss_sum, correct, seen = parallel.sum_over_processes([loss_sum, correct, seen])
            samples += seen
            test_acc = (predict(module, prepare, data.x_test, device) == data.y_test).float().mean().item()
            row = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
            history.append({**row, "test_accuracy": test_acc, "epsilon": epsilon()})
            if group.main:
                utils.write_csv(history_path, history)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{test_acc:.3f}", eps=history[-1]["epsilon"] or "-")
    except KeyboardInterrupt:
        if engine and group.main:
            with utils.shielded_from_interrupts():  # a second Ctrl-C must not swallow what the run spent
                print(f"\n{run.name} stopped after {steps} steps: ε spent so far = {epsilon():.3f} (δ = {cfg.delta}).")
        raise
    finally:
        bar.close()
        if regularizer:
            regularizer.remove()

    scores = classification_metrics(data.y_test, predict(module, prepare, data.x_test, device), data.num_classes)
    dp = engine is not None
    metrics = {
        "run": run.name, "dataset": data.name, "model": run.model, "privacy": run.privacy,
        "target_epsilon": run.target_epsilon, "epsilon": epsilon(), "delta": cfg.delta if dp else None,
        "noise_multiplier": optimizer.noise_multiplier if dp else None,
        "max_grad_norm": cfg.max_grad_norm if dp else None, "sample_rate": loader.sample_rate if dp else None,
        "steps": steps, "epochs": cfg.epochs, **scores, "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds, "seed": cfg.seed,
        "kappa": (cfg.lr * cfg.reg_sigma) ** 2 if regularizer else None, "accountant": cfg.accountant if dp else None,
        "pretrained": cfg.pretrained if run.model in PRETRAINED else None,
        "finetune": cfg.finetune if run.model in PRETRAINED else None,
        "grad_sample_mode": run.grad_sample_mode if dp else None, "processes": group.world_size,
    }  # fmt: skip
    if canaries:
        metrics.update(canaries.audit(cfg.delta, cfg.accountant))
    return metrics


def fresh_model(template: nn.Module) -> nn.Module:
    """An untrained copy of the template for one run, so every privacy mode starts from the same weights.
    A frozen backbone is never trained, so it is shared rather than copied."""
    frozen = isinstance(template, FrozenBackbone) and template.frozen
    return copy.deepcopy(template, {id(template.backbone): template.backbone} if frozen else {})


def study_template(cfg: config.TrainConfig, name: str, data: DataSplit) -> nn.Module:
    """The untrained model every run of `name` starts from; a pretrained backbone unfrozen for --finetune full."""
    model = create_model(name, data.input_shape, data.num_classes, cfg.pretrained)
    return model.unfreeze() if isinstance(model, FrozenBackbone) and cfg.finetune == "full" else model


@torch.no_grad()
def trainable_input(template: nn.Module, data: DataSplit) -> torch.Tensor:
    """Two training samples as the trainable module takes them (a frozen backbone's head: their features)."""
    x = data.x_train[:2]
    return template.features(x) if isinstance(template, FrozenBackbone) and template.frozen else x


def head_inputs(
    cfg: config.TrainConfig, template: nn.Module, data: DataSplit, device: torch.device
) -> tuple[DataSplit, Callable[[torch.Tensor], torch.Tensor], float]:
    """What the trainable module trains on: the frozen backbone's features computed once per split (the
    feature cache), else the images, with the backbone run in every step when the cache is off.
    Returns the split, the per-batch transform and the seconds the cache took."""
    if not isinstance(template, FrozenBackbone) or not template.frozen:
        return data, nn.Identity(), 0.0
    if not cfg.feature_cache:
        return data, template.to(device).features, 0.0
    start = time.perf_counter()
    features = dataclasses.replace(
        data,
        x_train=compute_features(template, data.x_train, device),
        x_test=compute_features(template, data.x_test, device),
    )
    return features, nn.Identity(), time.perf_counter() - start


def run_study(cfg: config.TrainConfig) -> None:
    """Every check first (data, names, DP noise, Opacus engines, finished runs), then the unfinished runs under
    a lock on the output directory (one after another, as Ray tasks with --workers/--ray-address, or each by
    all the processes of a torchrun job), then the summaries rebuilt from the run directories."""
    utils.check_output(cfg.out)
    group, device = parallel.join_process_group(cfg.device)
    try:
        run_grid(cfg, group, device)
    finally:
        parallel.leave_process_group()


def run_grid(cfg: config.TrainConfig, group: ProcessGroup, device: torch.device) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    opts = DataOptions(cfg.data_root, cfg.download, cfg.seed, cfg.test_fraction, cfg.image_size)
    data = load_dataset(cfg.dataset, opts)
    if len(data.y_test) == 0:
        raise utils.UsageError(f"dataset '{cfg.dataset}' has no test split (it is meant for attacks); train on faces.")
    cfg.validate_data(len(data.y_train))
    runs = study_runs(cfg, data.name, len(data.y_train))
    done = parallel.from_main(finished_runs(cfg, runs) if group.main else None)
    if isinstance(done, utils.UsageError):  # raised by every process of a job, so that none waits for the others
        raise done
    utils.seed_everything(cfg.seed)
    templates = {name: study_template(cfg, name, data) for name in cfg.models}
    engines = {
        name: choose_grad_sample_mode(
            trainable_module(templates[name]), cfg.grad_sample_mode, trainable_input(templates[name], data)
        )
        for name in {run.model for run in runs if run.privacy == "dp-sgd"}
    }
    runs = [dataclasses.replace(run, grad_sample_mode=engines.get(run.model, "hooks")) for run in runs]
    pending = [run for run in runs if cfg.force or run.name not in done]
    for run in runs:
        if run not in pending and group.main:
            print(f"{run.name}: finished already, skipped (--force redoes it)")

    with utils.study_lock(cfg.out) if group.main else contextlib.nullcontext():
        # per model: what its trainable part trains on (the feature cache), computed once for all its runs
        inputs = {name: head_inputs(cfg, templates[name], data, device) for name in cfg.models
                  if any(run.model == name for run in pending)}  # fmt: skip
        shared = cfg, templates, inputs, device, group
        outcomes = parallel.run_tasks(
            train_run,
            shared,
            pending,
            workers=cfg.workers,
            address=cfg.ray_address,
            desc="training study",
            progress=group.main,
        )
        if not group.main:
            return
        rows = utils.write_summary(cfg.out, SUMMARY_COLUMNS, benchmark_table, lambda r: run_bounds(r, cfg.prior_size))
    names = {run.name for run in runs}
    print("\n" + benchmark_table([r for r in rows if r["run"] in names]))
    print(
        f"{len(runs)} runs in {cfg.out}/; {cfg.out / 'summary.csv'} and summary.md list all {len(rows)} finished there."
    )
    lost = [run.name for run, outcome in zip(pending, outcomes, strict=True) if isinstance(outcome, Exception)]
    failed = [run.name for run, outcome in zip(pending, outcomes, strict=True) if outcome is False]
    if lost:
        raise utils.UsageError(
            f"{len(lost)} run(s) were lost with their Ray worker: {', '.join(lost)}. The other runs are finished; "
            "run the same command again to redo only these."
        )
    if failed:
        raise utils.UsageError(
            f"{len(failed)} run(s) failed, their training loss diverged: {', '.join(failed)} (each directory holds "
            "failed.json). Lower --lr (or, under DP-SGD, --max-grad-norm) and run the same command again."
        )


def finished_runs(cfg: config.TrainConfig, runs: list[Run]) -> set[str] | utils.UsageError:
    """The runs the output directory holds finished, each made with this study's settings, or the error that
    stops the study where one was not. The main process decides (it alone writes, and another node of a job
    across machines may have no copy of the directory); the error is returned, for every process to raise."""
    try:
        for run in runs:
            if utils.run_is_done(cfg.out / run.name) and not cfg.force:
                utils.check_finished_run(
                    cfg.out / run.name,
                    run_config(cfg, run),
                    NOT_RESULT_FIELDS,
                    utils.config_defaults(config.TrainConfig),
                )
    except utils.UsageError as err:
        return err
    return {run.name for run in runs if utils.run_is_done(cfg.out / run.name)}


def train_run(shared: tuple, run: Run) -> bool:
    """One unfinished run of the grid: config.json, the training, model.safetensors and metrics.json last (the
    main process writes). A diverged run writes failed.json instead of metrics.json. False when it failed.
    `shared` holds what every run reads: the config, the models' templates, what each model's trainable part
    trains on (head_inputs), the device and the process group."""
    cfg, templates, inputs, device, group = shared
    if cfg.threads:  # a Ray worker starts with torch's own thread count
        torch.set_num_threads(cfg.threads)
    run_dir = cfg.out / run.name
    split, prepare, feature_seconds = inputs[run.model]
    if group.main:
        utils.write_json(run_dir / "config.json", run_config(cfg, run))
        (run_dir / "failed.json").unlink(missing_ok=True)
    model = fresh_model(templates[run.model])
    try:
        metrics = fit(cfg, run, trainable_module(model), prepare, split, device, run_dir / "history.csv", group)
    except Diverged as err:
        if group.main:
            utils.write_json(run_dir / "failed.json", {"run": run.name, "reason": str(err)})
            print(f"{run.name}: FAILED, {err}")
        return False
    if not group.main:
        return True
    save_checkpoint(model, run_dir / "model.safetensors")
    metrics["feature_seconds"] = feature_seconds
    utils.write_json(run_dir / "metrics.json", metrics)
    eps = f", ε spent {metrics['epsilon']:.2f}" if metrics["epsilon"] is not None else ""
    print(f"{run.name}: accuracy {metrics['accuracy']:.3f}, MCC {metrics['mcc']:.3f}{eps}")
    return True
