"""Attack speed on CPU: iterations per second and seconds until the matched reconstructions reach a mean
PSNR of 30 dB, for each attack on the DLG LeNet (digits, 32x32), undefended, batch 1 and 8.

    uv run python bench/attack_bench.py                      # dlg idlg dlg-adam ig, batch 1 and 8
    uv run python bench/attack_bench.py --attacks dlg --batch-sizes 1 --threads 2

Seconds to 30 dB = the first logged iteration whose mean PSNR reaches 30 dB, divided by the run's mean
iteration rate (the attack hands its logged states over at the end, so they are scored off the clock).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from attacks import ATTACKS  # noqa: E402
from data_sources import load_dataset  # noqa: E402
from defenses import ClientSetup, MechanismSpec, client_update  # noqa: E402
from metrics import reconstruction_scores  # noqa: E402
from models import create_model  # noqa: E402

TARGET_PSNR = 30.0


@dataclass
class BenchConfig:
    attacks: list[str] = field(default_factory=lambda: ["dlg", "idlg", "dlg-adam", "ig"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    log_every: int = 5  # resolution of the time-to-30-dB measurement, in iterations
    threads: int = 1
    seed: int = 0


def bench_one(attack: str, batch_size: int, cfg: BenchConfig) -> list[object]:
    """One timed attack; the scoring of its logged states happens after the clock stops."""
    split = load_dataset("digits")
    torch.manual_seed(cfg.seed)
    model = create_model("lenet", split.input_shape, split.num_classes)
    x, y = split.x_train[:batch_size], split.y_train[:batch_size]
    update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup(seed=cfg.seed))
    iterations = ATTACKS[attack].default_iterations
    attack_cfg = SimpleNamespace(seed=cfg.seed, restarts=1, iterations=iterations, log_every=cfg.log_every)
    logged: list[tuple[int, torch.Tensor]] = []
    start = time.perf_counter()
    ATTACKS[attack].run(
        model, update, split.input_shape, split.num_classes, attack_cfg, lambda i, im, *_: logged.append((i, im))
    )
    seconds = time.perf_counter() - start
    rate = iterations / seconds
    psnr = {i: sum(reconstruction_scores(x, images)["psnr"]) / batch_size for i, images in logged}
    first = next((i for i, p in sorted(psnr.items()) if p >= TARGET_PSNR), None)
    return [attack, batch_size, iterations, rate, seconds, None if first is None else first / rate, psnr[iterations]]


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    torch.set_num_threads(cfg.threads)
    rows = [bench_one(a, b, cfg) for a in cfg.attacks for b in cfg.batch_sizes]
    header = ["attack", "batch", "iterations", "iterations/s", "seconds", "seconds to 30 dB", "final PSNR (dB)"]
    print(f"LeNet on digits (1x32x32), CPU, {cfg.threads} thread(s), torch {torch.__version__}")
    print(utils.markdown_table(header, rows))


if __name__ == "__main__":
    main()
