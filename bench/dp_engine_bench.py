"""DP-SGD past the defaults: Opacus' per-sample gradient engines against plain training, and one run trained by
one or two processes (torchrun).

    uv run python bench/dp_engine_bench.py [--tables 1 2 3] [--repeats 3] [--resnet resnet18 --resnet-size 32]
    uv run python bench/dp_engine_bench.py --tables 1 4 --dataset digits --batch-size 128 --epochs 2 --engines ghost bk
    uv run python bench/dp_engine_bench.py --tables 3 --dist-epochs 5 --dist-args="--dataset digits --batch-size 128"

1. the cnn on faces (the study's batch size 32; --dataset, --batch-size), plain vs DP-SGD under each engine (hooks,
   functorch, ew, ghost, and bk: book-keeping on Opacus' ghost-mode hooks, bookkeeping.py);
2. a ResNet fine-tuned end to end (random weights, BatchNorm -> GroupNorm through Opacus' ModuleValidator, the
   images resized to --resnet-size), the same settings;
3. the cnn, plain and under DP-SGD (the engine `auto` takes), trained by 1 process with 1 and with 2 torch
   threads and by 2 processes with 1 thread each (`torchrun --nproc_per_node N train.py`, gloo on CPU);
4. where one step's CPU time goes, plain against bk (table 1's data and batch size).

Every setting runs in a fresh process through training.fit or train.py, the study's own code: samples/s over the
training seconds (evaluation excluded). The settings of a table run in turn, --repeats times over (interleaved,
so a neighbour's load falls on all of them alike); a table shows the median samples/s and the median of the
repetitions' ratios to plain training (tables 1-2) or to one single-threaded process (table 3). Peak memory
(tables 1-2) is the training's rise over the process at rest before it, measured after a warm-up epoch (two batches, at least 64 samples) of
the same setting in the same process (so lazy imports, oneDNN's caches and the accountant's scipy are not
counted as training memory): the peak resident set on CPU, reset through /proc/self/clear_refs, CUDA's peak
allocation on a GPU; beside it the whole process's peak.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

ENGINES = ["hooks", "functorch", "ew", "ghost", "bk"]


@dataclass
class BenchConfig:
    tables: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    engines: list[str] = field(default_factory=lambda: list(ENGINES))  # the DP engines of tables 1-2
    dataset: str = "faces"  # table 1's data (the study's default; digits has 1347 training images)
    batch_size: int = 32  # table 1's batch size (the study's default)
    epochs: int = 4  # training epochs per setting (150 faces each)
    repeats: int = 3  # interleaved repetitions of every setting; the tables show medians
    resnet: str = "resnet18"  # timm architecture fine-tuned in table 2 (random weights; resnet50 works, slowly)
    resnet_size: int = 32  # the side its inputs are resized to
    resnet_epochs: int = 1  # its epochs per setting (expanded weights take minutes per epoch on a CPU)
    dist_epochs: int = 20  # epochs per setting of table 3
    dist_args: str = ""  # more train.py options for table 3, e.g. --dist-args="--dataset digits --batch-size 128"
    threads: int = 1  # torch CPU threads per process (the study's default)
    device: str = "auto"
    step_count: int = 200  # steps timed per column of table 4 (after as many of warm-up)
    one: str | None = None  # internal: measure one setting, MODEL:MODE, in this process and print it as JSON


def _memory_kib(field_name: str) -> int:
    return int(re.search(rf"{field_name}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_one(bench: BenchConfig) -> dict:
    """One setting in this (fresh) process: MODEL:MODE, MODE plain or an engine."""
    import torch

    import training
    from config import TrainConfig
    from data_sources import load_dataset
    from models import FrozenBackbone, create_model, trainable_module
    from privacy import noise_multiplier_for, poisson_schedule

    model_name, mode = bench.one.split(":")
    torch.set_num_threads(bench.threads)
    epochs = bench.epochs if model_name == "cnn" else bench.resnet_epochs
    batch = bench.batch_size if model_name == "cnn" else 32
    cfg = TrainConfig(epochs=epochs, device=bench.device, threads=bench.threads, batch_size=batch)
    device = utils.pick_device(bench.device)
    data = load_dataset(bench.dataset if model_name == "cnn" else "faces")
    utils.seed_everything(0)
    if model_name == "cnn":
        model = create_model("cnn", data.input_shape, data.num_classes)
    else:
        import timm

        backbone = timm.create_model(bench.resnet, pretrained=False, num_classes=0)
        model = FrozenBackbone(backbone, backbone.num_features, data.num_classes, bench.resnet_size).unfreeze()
    privacy = "none" if mode == "plain" else "dp-sgd"
    z = noise_multiplier_for(8.0, cfg.delta, *poisson_schedule(len(data.y_train), cfg.batch_size, cfg.epochs))
    run = training.Run(bench.one, model_name, privacy, 8.0, z, mode if privacy == "dp-sgd" else "hooks")
    few = max(64, 2 * batch)
    with tempfile.TemporaryDirectory() as tmp:  # warm-up: one epoch of the same setting on a copy, 2 batches or 64
        warm = TrainConfig(epochs=1, device=bench.device, threads=bench.threads, batch_size=batch)
        sample = dataclasses.replace(
            data,
            x_train=data.x_train[:few],
            y_train=data.y_train[:few],
            x_test=data.x_test[:64],
            y_test=data.y_test[:64],
        )
        training.fit(
            warm, run, trainable_module(copy.deepcopy(model)), torch.nn.Identity(), sample, device, Path(tmp) / "h"
        )
    cuda = device.type == "cuda"
    if cuda:
        model.to(device)
        torch.cuda.reset_peak_memory_stats(device)
        rest = torch.cuda.memory_allocated(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak resident set restarts from here
        rest = _memory_kib("VmRSS") * 1024
    with tempfile.TemporaryDirectory() as tmp:
        metrics = training.fit(
            cfg, run, trainable_module(model), torch.nn.Identity(), data, device, Path(tmp) / "h.csv"
        )
    peak = torch.cuda.max_memory_allocated(device) if cuda else _memory_kib("VmHWM") * 1024
    return {"samples_per_second": metrics["samples_per_second"], "rise_mib": (peak - rest) / 2**20,
            "peak_mib": peak / 2**20}  # fmt: skip


def in_fresh_process(bench: BenchConfig, setting: str) -> dict:
    args = [sys.executable, __file__, "--one", setting, "--epochs", str(bench.epochs), "--resnet", bench.resnet,
            "--resnet-size", str(bench.resnet_size), "--resnet-epochs", str(bench.resnet_epochs), "--threads", str(bench.threads), "--device", bench.device,
            "--dataset", bench.dataset, "--batch-size", str(bench.batch_size)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(runs: dict[Any, list[dict]], base: Any, key: str = "samples_per_second") -> dict[str, dict]:
    """Per setting: the median of each measured value, and the median over repetitions of its ratio to `base`
    measured in the same repetition (time ratio base/setting for rates, setting/base for memory)."""
    out = {}
    for name, reps in runs.items():
        if any("error" in r for r in reps):
            out[name] = next(r for r in reps if "error" in r)
            continue
        pairs = list(zip(runs[base], reps, strict=True))
        out[name] = {k: None if reps[0][k] is None else statistics.median(r[k] for r in reps) for k in reps[0]}
        out[name]["speed"] = statistics.median(r[key] / b[key] for b, r in pairs)
        if "rise_mib" in reps[0]:
            out[name]["memory"] = statistics.median(r["rise_mib"] / b["rise_mib"] for b, r in pairs)
    return out


def engine_rows(bench: BenchConfig, model: str) -> list[list]:
    settings = ["plain", *bench.engines]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(bench.repeats):
        for setting in settings:
            runs[setting].append(in_fresh_process(bench, f"{model}:{setting}"))
    rows = []
    for setting, m in medians(runs, "plain").items():
        label = setting if setting == "plain" else f"DP-SGD, {setting}"
        if "error" in m:
            rows.append([label, f"fails: {m['error'][:100]}", "--", "--", "--", "--"])
            continue
        rows.append([label, m["samples_per_second"], 1 / m["speed"], m["rise_mib"], m["memory"], m["peak_mib"]])
    return rows


def process_rows(work: Path, bench: BenchConfig) -> list[list]:
    """Table 3: train.py under torchrun, 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread;
    samples/s of all processes together, each setting in turn, --repeats times over."""
    from privacy import ENGINE_PREFERENCE

    layouts = [(1, 1), (1, 2), (2, 1)]  # (processes, torch threads per process)
    rows = []
    for privacy in ("none", "dp-sgd"):
        runs: dict[tuple[int, int], list[dict]] = {layout: [] for layout in layouts}
        for rep in range(bench.repeats):
            for n, threads in layouts:
                out = work / f"{privacy}-{n}x{threads}-{rep}"
                args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        "train.py", "--models", "cnn", "--privacy", privacy, "--epsilons", "8", "--accountant", "rdp", "--epochs",
                        str(bench.dist_epochs), "--threads", str(threads), "--device", bench.device,
                        "--out", str(out), *shlex.split(bench.dist_args)]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
                (metrics,) = (utils.read_json(p) for p in out.glob("*/metrics.json"))
                runs[(n, threads)].append({k: metrics[k] for k in ("samples_per_second", "accuracy", "epsilon")})
        label = "plain (DDP)" if privacy == "none" else f"DP-SGD ({ENGINE_PREFERENCE[0]}, DPDDP)"
        for (n, threads), m in medians(runs, (1, 1)).items():
            eps = m["epsilon"] if privacy == "dp-sgd" else None
            rows.append([label, n, threads, m["samples_per_second"], m["speed"], m["accuracy"], eps])
    return rows


def step_rows(work: Path, bench: BenchConfig) -> list[list]:
    """Table 4: where one step's CPU time goes, plain training against book-keeping, on the first batch of table
    1's data (process time, so a neighbour's load counts less; --step-count steps after as many of warm-up). The
    phases are timed by wrapping the functions that run them: bookkeeping's per-layer rules (the norms, run by the
    backward hooks), its clipped sums and Opacus' noise."""
    import collections
    import time
    import warnings

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import bookkeeping
    from data_sources import load_dataset
    from models import create_model
    from privacy import make_private

    warnings.filterwarnings("ignore", message="Secure RNG turned off|Full backward hook is firing")  # as train.py
    torch.set_num_threads(bench.threads)
    data = load_dataset(bench.dataset)
    x, y = data.x_train[: bench.batch_size], data.y_train[: bench.batch_size]
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(name: str, fn):
        def run(*args, **kwargs):
            start = time.process_time()
            out = fn(*args, **kwargs)
            spent[name] += time.process_time() - start
            return out

        return run

    rule_for = bookkeeping.rule_for
    bookkeeping.rule_for = lambda layer: timed(f"per-sample norms, {type(layer).__name__}", rule_for(layer))
    columns = {}
    for mode in ("plain", "bk"):
        utils.seed_everything(0)
        model = create_model("cnn", data.input_shape, data.num_classes)
        optimizer, criterion = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), torch.nn.CrossEntropyLoss()
        if mode == "bk":
            loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=bench.batch_size)
            _, model, optimizer, criterion, _ = make_private(
                model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", seed=0,
                grad_sample_mode="bk",
            )  # fmt: skip
            model.write_clipped_gradients = timed("clipped sums", model.write_clipped_gradients)
            optimizer.add_noise = timed("noise", optimizer.add_noise)
        for _ in range(2):  # a warm-up pass, then the counted one
            spent.clear()
            for _ in range(bench.step_count):
                start = time.process_time()
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(x), y)
                forward = time.process_time()
                loss.backward()
                backward = time.process_time()
                optimizer.step()
                spent["forward"] += forward - start
                spent["backward"] += backward - forward
                spent["optimizer step"] += time.process_time() - backward
        columns[mode] = {k: v / bench.step_count * 1e3 for k, v in spent.items()}
    bookkeeping.rule_for = rule_for
    bk = columns["bk"]
    inside_backward = sum(v for k, v in bk.items() if k.startswith("per-sample") or k == "clipped sums")
    bk["backward"] -= inside_backward  # the hooks' norms and the clipped sums run within loss.backward()
    bk["optimizer step"] -= bk["noise"]
    labels = {"forward": "forward (with Opacus' activation hooks)", "backward": "backward pass (autograd and hooks)",
              "optimizer step": "optimizer step (without the noise)"}  # fmt: skip
    phases = ["forward", "backward", *sorted(k for k in bk if k.startswith("per-sample")), "clipped sums", "noise"]
    rows = [[labels.get(k, k), columns["plain"].get(k), bk[k]] for k in [*phases, "optimizer step"]]
    total = {mode: sum(c.values()) for mode, c in columns.items()}
    return [*rows, ["whole step", total["plain"], total["bk"]], ["÷ plain", 1.0, total["bk"] / total["plain"]]]


HEADER = [
    "setting",
    "samples/s",
    "time per epoch ÷ plain",
    "peak rise (MiB)",
    "peak rise ÷ plain",
    "process peak (MiB)",
]
TABLES = {
    1: ("the cnn (--dataset, --batch-size): plain vs each Opacus engine", lambda work, bench: engine_rows(bench, "cnn"), HEADER),
    2: ("a ResNet fine-tuned end to end (random weights)", lambda work, bench: engine_rows(bench, "resnet"), HEADER),
    3: ("one run, 1 vs 2 processes (torchrun)", process_rows,
        ["setting", "processes", "threads each", "samples/s", "× 1 process, 1 thread", "accuracy", "ε"]),
    4: ("one step of the cnn (--dataset, --batch-size), CPU milliseconds by phase", step_rows,
        ["phase", "plain", "DP-SGD, bk"]),
}  # fmt: skip


def main() -> None:
    bench = tyro.cli(BenchConfig, description=__doc__)
    if bench.one:
        print(json.dumps(measure_one(bench)))
        return
    from data_sources import DATASETS

    if unknown := [e for e in bench.engines if e not in ENGINES]:
        raise utils.UsageError(f"--engines {' '.join(unknown)} is unknown; choose from {' '.join(ENGINES)}.")
    if bench.dataset not in DATASETS:
        raise utils.UsageError(f"--dataset {bench.dataset} is unknown; choose from {', '.join(DATASETS)}.")
    if bench.batch_size < 1:
        raise utils.UsageError(f"--batch-size {bench.batch_size} must be at least 1.")
    import torch

    device = utils.pick_device(bench.device)
    print(
        f"DP-SGD engines on {device}, {bench.threads} torch thread(s) per process (tables 1-2), {os.cpu_count()} CPUs,"
        f" medians of {bench.repeats} interleaved repetitions"
    )
    if 2 in bench.tables:
        print(f"table 2: timm {bench.resnet}, inputs resized to {bench.resnet_size} px")
    del torch
    utils.print_measured_tables(TABLES, bench.tables, bench)


if __name__ == "__main__":
    utils.run_cli(main)
