"""Training throughput, measured side by side in one process on this machine:

- the cnn on faces, plain vs DP-SGD (Opacus per-sample gradients, clipping and noise), at the study's
  batch size; the noise-multiplier search and ε bookkeeping are outside the timed loop;
- head-only training of resnet50 on faces with the feature cache (backbone run once per split, its time
  included) vs the naive loop (backbone run in every step). resnet50 is built with random weights
  (--no-pretrained: no network here), which costs the same as the pretrained one.

    uv run python bench/train_bench.py [--epochs 5] [--naive-epochs 1] [--cache-epochs 15] [--threads 0]

samples/s counts training samples over training seconds (plus the cache's seconds), so settings measured
over different numbers of epochs compare fairly: the naive loop's rate does not change from epoch to epoch.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training  # noqa: E402
import utils  # noqa: E402
from config import TrainConfig  # noqa: E402
from data_sources import load_dataset  # noqa: E402
from models import create_model, trainable_module  # noqa: E402


@dataclass
class BenchConfig:
    epochs: int = 5  # cnn epochs per setting
    naive_epochs: int = 1  # the naive head loop costs the same per sample in every epoch: one shows its rate
    cache_epochs: int = 15  # the study's default: the cache's one-off cost is spread over these epochs
    threads: int = 0  # torch CPU threads; 0 keeps torch's default (the study's --threads defaults to 1)
    device: str = "auto"


def measure(cfg: TrainConfig, model_name: str, privacy: str, label: str, work: Path) -> dict:
    """Samples per second of one training run, counting the feature cache's time when there is one."""
    device = utils.pick_device(cfg.device)
    data = load_dataset(cfg.dataset)
    utils.seed_everything(cfg.seed)
    template = create_model(model_name, data.input_shape, data.num_classes, pretrained=cfg.pretrained)
    split, prepare, cache_seconds = training.head_inputs(cfg, template, data, device)
    run = training.Run(label, model_name, privacy, 8.0 if privacy == "dp-sgd" else None)
    model = training.fresh_model(template)
    metrics = training.fit(cfg, run, trainable_module(model), prepare, split, device, work / "history.csv")
    samples = metrics["samples_per_second"] * metrics["train_seconds"]
    seconds = metrics["train_seconds"] + cache_seconds
    return {"setting": label, "epochs": cfg.epochs, "samples": round(samples), "seconds": seconds,
            "samples_per_second": samples / seconds}  # fmt: skip


def main() -> None:
    bench = tyro.cli(BenchConfig, description=__doc__)
    device = utils.pick_device(bench.device)
    cnn = TrainConfig(epochs=bench.epochs, device=bench.device)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    naive = TrainConfig(epochs=bench.naive_epochs, pretrained=False, feature_cache=False, device=bench.device)
    cached = dataclasses.replace(naive, epochs=bench.cache_epochs, feature_cache=True)
    pairs = [
        ((cnn, "cnn", "none", "cnn, plain"), (cnn, "cnn", "dp-sgd", "cnn, DP-SGD (ε = 8)")),
        ((naive, "resnet50", "none", "resnet50 head, naive loop"),
         (cached, "resnet50", "none", "resnet50 head, feature cache")),
    ]  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for base, other in pairs:
            first, second = (measure(*spec, Path(tmp)) for spec in (base, other))
            first["ratio"], second["ratio"] = 1.0, second["samples_per_second"] / first["samples_per_second"]
            rows += [first, second]
    print(f"\nTraining throughput on {device} ({torch.get_num_threads()} threads), faces (150 training images)\n")
    header = ["setting", "epochs", "samples", "seconds", "samples/s", "ratio to the pair's first row"]
    print(utils.markdown_table(header, [[r[k] for k in ("setting", "epochs", "samples", "seconds",
                                                          "samples_per_second", "ratio")] for r in rows]))  # fmt: skip


if __name__ == "__main__":
    utils.run_cli(main)
