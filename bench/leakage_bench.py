"""Benchmark of the leakage study's goals (issue #9), each measured through the commands a user runs
(train.py and gradient_attack.py, in-process, on a scratch directory), printed as Markdown tables:

1. the cnn that `uv run train.py` trains on faces, batch 1: median PSNR / SSIM of `auto` (and of each
   candidate) over --images images, for the plain run without a defense and for every DP-SGD and
   regularized run under its own mechanism;
2. an untrained cnn on faces, batch 1: per image, `auto` (fc-readout and ig at 2000 steps) against ig alone
   at 2000 steps;
3. the frozen resnet50 / dinov2 heads (random weights offline), batch 1: cosine of the features read to the
   true ones;
4. LeNet on digits, batch 4 and 8, 500 steps: each attack's mean and median PSNR and the share of images at
   25 dB or more (breaching's Inverting Gradients: 12.6 / 12.0 dB at 500 steps);
5. the cost of restarts: ig on the cnn, --restarts 4 against --restarts 1.

    uv run python bench/leakage_bench.py            # everything (~20 min on 2 CPU cores)
    uv run python bench/leakage_bench.py --quick    # fewer images and steps, to check it runs
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradient_attack  # noqa: E402
import train  # noqa: E402
import utils  # noqa: E402


@dataclass
class BenchConfig:
    images: int = 8  # images attacked per cell (one at a time where the batch is 1)
    quick: bool = False  # 2 images and a tenth of the steps: a smoke run
    tables: tuple[int, ...] = (1, 2, 3, 4, 5)  # which of the tables above to measure


def attack(out: Path, *args: str) -> list[dict]:
    """gradient_attack.py with these options into `out`; the metrics.json (with the per-image scores) of every
    finished run in `out`."""
    gradient_attack.main(["--out", str(out), *args])
    rows = utils.read_csv(out / "summary.csv")
    return [utils.read_json(out / r["run"] / "metrics.json") for r in rows]


def per_image(metrics: dict, key: str) -> np.ndarray:
    return np.array([p[key] for p in metrics["per_image"]], dtype=float)


def trained_cnn(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 1: the default training study, then its runs attacked one at a time (the plain one without a
    defense only, the others under their own mechanism)."""
    train.main(["--out", str(root / "train")] + (["--epochs", "2"] if cfg.quick else []))
    steps = ["--iterations", "100", "--inversion-steps", "30"] if cfg.quick else []
    common = ["--num-images", str(cfg.images), *steps]
    attack(root / "trained", "--from-run", str(root / "train" / "faces-cnn-none-s0"), "--mechanisms", "none", *common)
    runs = [str(root / "train" / f"faces-cnn-{run}-s0") for run in ("dp-sgd-eps8", "dp-sgd-eps25", "dp-sgd-eps50")]
    rows = attack(root / "trained", "--from-run", *runs, str(root / "train" / "faces-cnn-regularized-s0"), *common)
    table = []
    for m in sorted(rows, key=lambda m: (m["victim"], m["attack"])):
        psnr, ssim = per_image(m, "psnr"), per_image(m, "ssim")
        release = "--" if m["release_epsilon"] is None else f"{m['epsilon']:.1f} / {m['release_epsilon']:.1f}"
        table.append([m["victim"], m["mechanism"], release, m["attack"], np.median(psnr), np.median(ssim),
                      psnr.min(), psnr.max(), m["seconds"] / len(psnr)])  # fmt: skip
    return table


def untrained_cnn(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 2: auto (fc-readout and ig, both at their settings below) against ig alone, image by image."""
    iterations = "200" if cfg.quick else "2000"
    rows = attack(root / "untrained", "--model", "cnn", "--dataset", "faces", "--mechanisms", "none",
                  "--num-images", str(cfg.images), "--iterations", iterations)  # fmt: skip
    by_attack = {m["attack"]: m for m in rows}
    auto, ig = per_image(by_attack["auto"], "psnr"), per_image(by_attack["ig"], "psnr")
    chosen = [c["attack"] for c in by_attack["auto"]["chosen"]]
    return [[i, ig[i], auto[i], chosen[i], auto[i] >= ig[i] - 1e-9] for i in range(len(ig))]


def frozen_heads(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 3: the features a frozen backbone's head gives away (random weights: no download offline)."""
    table = []
    for backbone in ("resnet50", "dinov2"):
        rows = attack(root / backbone, "--model", backbone, "--dataset", "faces", "--no-pretrained", "--mechanisms",
                      "none", "--num-images", "2", "--inversion-steps", "10" if cfg.quick else "100")  # fmt: skip
        m = next(r for r in rows if r["attack"] == "fc-readout")
        cosine = per_image(m, "feature_cosine")
        table.append([backbone, cosine.min(), m["psnr"], m["seconds"] / len(cosine)])
    return table


def lenet_batches(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 4: LeNet on digits at batch 4 and 8, every honest attack at 500 steps."""
    steps = "50" if cfg.quick else "500"
    rows = attack(root / "lenet", "--model", "lenet", "--dataset", "digits", "--mechanisms", "none",
                  "--batch-sizes", "4", "8", "--num-images", "8", "--iterations", steps,
                  "--attacks", "auto", "ig-naive")  # fmt: skip
    table = []
    for m in sorted(rows, key=lambda m: (m["batch_size"], m["attack"])):
        psnr = per_image(m, "psnr")
        table.append([m["batch_size"], m["attack"], m["iterations"], psnr.mean(), np.median(psnr),
                      (psnr >= 25).mean(), m["seconds"]])  # fmt: skip
    return table


def restarts(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 5: one batched optimisation of 4 restarts against 1 (ig on the untrained cnn, 2 images)."""
    table = []
    for count in (1, 4):
        start = time.perf_counter()
        rows = attack(root / f"restarts{count}", "--model", "cnn", "--dataset", "faces", "--mechanisms", "none",
                      "--attacks", "ig", "--num-images", "2", "--iterations", "100" if cfg.quick else "500",
                      "--restarts", str(count))  # fmt: skip
        table.append([count, time.perf_counter() - start, rows[0]["psnr"]])
    table[1].append(table[1][1] / table[0][1])
    return table


TABLES = {
    1: ("Trained cnn on faces, batch 1", trained_cnn,
        ["victim", "mechanism", "ε (run / release)", "attack", "median PSNR", "median SSIM", "min PSNR", "max PSNR",
         "s / image"]),
    2: ("Untrained cnn on faces, batch 1: auto against ig alone", untrained_cnn,
        ["image", "ig PSNR", "auto PSNR", "auto chose", "auto >= ig"]),
    3: ("Frozen-backbone heads, random weights, batch 1", frozen_heads,
        ["backbone", "min feature cosine", "PSNR after inversion", "s / image"]),
    4: ("LeNet on digits, batches of 4 and 8", lenet_batches,
        ["batch", "attack", "iterations", "mean PSNR", "median PSNR", "share >= 25 dB", "seconds"]),
    5: ("Restarts, ig on the cnn (faces, 2 images)", restarts, ["restarts", "seconds", "mean PSNR", "x restarts 1"]),
}  # fmt: skip


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    if cfg.quick:
        cfg.images = 2
    utils.print_measured_tables(TABLES, cfg.tables, cfg)


if __name__ == "__main__":
    utils.run_cli(main)
