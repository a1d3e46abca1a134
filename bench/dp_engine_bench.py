"""DP-SGD past the defaults: Opacus' per-sample gradient engines against plain training, and one run trained by
one or two processes (torchrun).

    uv run python bench/dp_engine_bench.py [--tables 1 2 3] [--epochs 4] [--resnet resnet18 --resnet-size 32]

1. the cnn on faces (the study's batch size 32), plain vs DP-SGD under each engine (hooks, functorch, ew, ghost);
2. a ResNet fine-tuned end to end (random weights, BatchNorm -> GroupNorm through Opacus' ModuleValidator, the
   images resized to --resnet-size), the same settings;
3. the cnn under DP-SGD (the fastest engine) and plain, trained by 1 and by 2 processes
   (`torchrun --nproc_per_node N train.py`, gloo on CPU, nccl on CUDA).

Every setting runs in a fresh process through training.fit, the study's own loop: samples/s over the training
seconds (evaluation excluded), and peak memory as the training's rise over the process at rest before it (the
peak resident set on CPU, reset just before training through /proc/self/clear_refs; CUDA's peak allocation on a
GPU), beside the whole process's peak. Ratios are to plain training of the same model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

ENGINES = ["hooks", "functorch", "ew", "ghost"]


@dataclass
class BenchConfig:
    tables: list[int] = field(default_factory=lambda: [1, 2, 3])
    epochs: int = 4  # training epochs per setting (150 faces each)
    resnet: str = "resnet18"  # timm architecture fine-tuned in table 2 (random weights; resnet50 works, slowly)
    resnet_size: int = 32  # the side its inputs are resized to
    resnet_epochs: int = 1  # its epochs per setting (expanded weights take minutes per epoch on a CPU)
    dist_epochs: int = 6  # epochs per setting of table 3
    threads: int = 1  # torch CPU threads per process (the study's default)
    device: str = "auto"
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
    cfg = TrainConfig(epochs=epochs, device=bench.device, threads=bench.threads)
    device = utils.pick_device(bench.device)
    data = load_dataset("faces")
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
            "--resnet-size", str(bench.resnet_size), "--resnet-epochs", str(bench.resnet_epochs), "--threads", str(bench.threads), "--device", bench.device]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_rows(bench: BenchConfig, model: str) -> list[list]:
    plain = in_fresh_process(bench, f"{model}:plain")
    rows = [["plain", plain["samples_per_second"], 1.0, plain["rise_mib"], 1.0, plain["peak_mib"]]]
    for engine in ENGINES:
        r = in_fresh_process(bench, f"{model}:{engine}")
        if "error" in r:
            rows.append([f"DP-SGD, {engine}", f"fails: {r['error'][:100]}", "--", "--", "--", "--"])
            continue
        time_ratio = plain["samples_per_second"] / r["samples_per_second"]
        rows.append([f"DP-SGD, {engine}", r["samples_per_second"], time_ratio, r["rise_mib"],
                     r["rise_mib"] / plain["rise_mib"], r["peak_mib"]])  # fmt: skip
    return rows


def process_rows(work: Path, bench: BenchConfig) -> list[list]:
    """Table 3: train.py under torchrun with 1 and 2 processes; samples/s of all processes together."""
    from privacy import ENGINE_PREFERENCE

    rows = []
    for privacy in ("none", "dp-sgd"):
        rates = {}
        for n in (1, 2):
            out = work / f"{privacy}-{n}"
            args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                    "train.py", "--models", "cnn", "--privacy", privacy, "--epsilons", "8", "--epochs",
                    str(bench.dist_epochs), "--threads", str(bench.threads), "--device", bench.device,
                    "--grad-sample-mode", ENGINE_PREFERENCE[0], "--out", str(out)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(bench.threads)}
            subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
            (metrics,) = (utils.read_json(p) for p in out.glob("*/metrics.json"))
            rates[n] = metrics["samples_per_second"]
            label = "plain" if privacy == "none" else f"DP-SGD ({ENGINE_PREFERENCE[0]})"
            rows.append([label, n, metrics["samples_per_second"], rates[n] / rates[1], metrics["accuracy"],
                         metrics["epsilon"]])  # fmt: skip
    return rows


HEADER = [
    "setting",
    "samples/s",
    "time per epoch ÷ plain",
    "peak rise (MiB)",
    "peak rise ÷ plain",
    "process peak (MiB)",
]
TABLES = {
    1: ("the cnn on faces: plain vs each Opacus engine", lambda work, bench: engine_rows(bench, "cnn"), HEADER),
    2: ("a ResNet fine-tuned end to end (random weights)", lambda work, bench: engine_rows(bench, "resnet"), HEADER),
    3: ("one run, 1 vs 2 processes (torchrun)", process_rows,
        ["setting", "processes", "samples/s", "× one process", "accuracy", "ε"]),
}  # fmt: skip


def main() -> None:
    bench = tyro.cli(BenchConfig, description=__doc__)
    if bench.one:
        print(json.dumps(measure_one(bench)))
        return
    import torch

    device = utils.pick_device(bench.device)
    print(f"DP-SGD engines on {device}, {bench.threads} torch thread(s) per process, {os.cpu_count()} CPUs")
    if 2 in bench.tables:
        print(f"table 2: timm {bench.resnet}, inputs resized to {bench.resnet_size} px")
    del torch
    utils.print_measured_tables(TABLES, bench.tables, bench)


if __name__ == "__main__":
    utils.run_cli(main)
