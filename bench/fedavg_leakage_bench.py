"""Benchmark of the FedAvg attacks (issue #12), measured through the command a user runs (gradient_attack.py
with --local-epochs/--local-batches, in-process, on a scratch directory), printed as Markdown tables:

1. leakage against local work: the share of a client's digits recovered (PSNR >= 25 dB) against the local SGD
   steps behind its update (batches of 5 images; up to 10 steps one epoch over `steps` batches, beyond that
   epochs of 10 batches), by every --attacks without a defense and by the --defended ones (fc-peel: seconds a
   run) under dp-sgd:8 / dp-fedavg:1 / secagg:2 too, at every step count; the same run writes the figure
   static/fedavg_leakage.png (figures.plot_fedavg_leakage);
2. Dimitrov et al.'s FEMNIST setting on digits: 10 epochs x 10 batches x 5 images, every --attacks on every
   --models (goal: >= 50 % recovered, where DLF recovers > 45 % on FEMNIST and the baseline < 10 %);
3. DMGAN (Hitaj et al. 2017): a malicious client without the target class trains a generator against the
   global model over simulated FedAvg rounds (defenses.client_update for every client, no Flower); scored by
   the nearest real target image's SSIM (skimage, data_range 1) and a held-out classifier's confidence.

    uv run python bench/fedavg_leakage_bench.py --tables 1 --model fcnn --attacks fc-peel   # ~10 min, the figure
    uv run python bench/fedavg_leakage_bench.py --tables 2 --attacks fc-peel dlf ig-weight --seed 1
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
import utils  # noqa: E402

RECOVERED_DB = 25.0
MECHANISMS = ["none", "dp-sgd:8", "dp-fedavg:1", "secagg:2"]


@dataclass
class BenchConfig:
    model: str = "mlp"  # the victim, fresh on digits (tables 1 and 3)
    models: tuple[str, ...] = ("fcnn", "mlp")  # table 2's victims
    attacks: tuple[str, ...] = ("fc-peel", "dlf", "ig-weight")  # table 1: at every step count without a defense
    defended: tuple[str, ...] = ("fc-peel",)  # ... and under every defense at every step count (fc-peel: seconds)
    steps: tuple[int, ...] = (1, 2, 5, 10, 20, 100)  # local SGD steps (table 1)
    iterations: int = 100  # attack iterations per client (few: the 2-core budget; the loss flattens by then)
    restarts: int = 1
    rounds: int = 20  # DMGAN: FedAvg rounds (table 3)
    target: int = 3  # DMGAN: the class the attacker lacks
    tables: tuple[int, ...] = (1, 3)  # 2 adds ig-multi at 100 steps (dlf and ig-weight are in table 1)
    figure: Path = Path("static/fedavg_leakage.png")
    seed: int = 0


def local_work(steps: int) -> tuple[int, int]:
    """(epochs, batches of 5): one epoch over `steps` batches up to 10 steps, else epochs of 10 batches."""
    return (1, steps) if steps <= 10 else (steps // 10, 10)


def attack(out: Path, cfg: BenchConfig, steps: int, attacks: list[str], mechanisms: list[str]) -> list[dict]:
    """gradient_attack.py on one client holding 5 x batches digits; the metrics.json of each run, with the
    local steps and recovered share added."""
    epochs, batches = local_work(steps)
    run_dir = out / f"{cfg.model}-steps{steps}-{'-'.join(attacks)}"
    args = ["--model", cfg.model, "--dataset", "digits", "--batch-sizes", "5", "--num-images", str(5 * batches)]
    args += ["--local-epochs", str(epochs), "--local-batches", str(batches), "--attacks", *attacks]
    args += ["--mechanisms", *mechanisms, "--iterations", str(cfg.iterations), "--restarts", str(cfg.restarts)]
    gradient_attack.main([*args, "--seed", str(cfg.seed), "--out", str(run_dir)])
    rows = []
    for row in utils.read_csv(run_dir / "summary.csv"):
        metrics = utils.read_json(run_dir / row["run"] / "metrics.json")
        psnr = np.array([p["psnr"] for p in metrics["per_image"]])
        rows.append(metrics | {"local_steps": steps, "recovered": float((psnr >= RECOVERED_DB).mean())})
    return rows


def leakage_vs_steps(out: Path, cfg: BenchConfig) -> list[list]:
    """Table 1 and the figure."""
    import pandas as pd

    from figures import plot_fedavg_leakage

    runs = []
    for steps in cfg.steps:
        for name in cfg.attacks:
            runs += attack(out, cfg, steps, [name], MECHANISMS if name in cfg.defended else ["none"])
    frame = pd.DataFrame(runs)
    frame["attack"] = pd.Categorical(frame.attack, list(cfg.attacks))
    frame = frame.sort_values(["attack", "local_steps"])
    frame["attack"] = frame.attack.astype(str)
    plot_fedavg_leakage(frame[["local_steps", "mechanism", "attack", "recovered", "psnr"]], cfg.figure)
    print(f"figure: {cfg.figure}")
    return [
        [r.local_steps, r.mechanism, r.attack, r.num_images, r.psnr, r.recovered, r.label_accuracy, r.seconds]
        for r in frame.itertuples()
    ]


def femnist_setting(out: Path, cfg: BenchConfig) -> list[list]:
    """Table 2: 10 epochs x 10 batches x 5 images, no defense, every attack of --attacks on every --models."""
    from dataclasses import replace

    runs = [r for m in cfg.models for a in cfg.attacks for r in attack(out, replace(cfg, model=m), 100, [a], ["none"])]
    return [
        [r["model"], r["attack"], r["num_images"], r["psnr"], r["recovered"], r["exact_readouts"], r["label_accuracy"],
         r["seconds"]]
        for r in runs
    ]  # fmt: skip


def dmgan(out: Path, cfg: BenchConfig) -> list[list]:
    """Table 3: DMGAN over simulated FedAvg rounds on digits."""
    import torch

    from attacks.federated import dmgan_update, gan_attacker, generate
    from data_sources import load_dataset
    from defenses import ClientSetup, MechanismSpec, client_update, trainable_parameters
    from evaluation import dmgan_judge
    from models import create_model

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(2)
    split = load_dataset("digits")
    x, y = split.x_train, split.y_train
    # 3 honest clients with IID thirds of the training set, the attacker a share without the target class
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))
    honest = [order[i::4] for i in range(3)]
    own = order[3::4][y[order[3::4]] != cfg.target]
    model = create_model(cfg.model, split.input_shape, split.num_classes + 1)  # + the attacker's fake class
    attacker = gan_attacker(split.input_shape, cfg.target, split.num_classes, seed=cfg.seed)
    setup, plain = ClientSetup(lr=0.05, seed=cfg.seed), MechanismSpec("none", None)
    scores = dmgan_judge(split.x_test, split.y_test, cfg.target)  # real target images unseen by model and attacker

    rows = [["untrained generator", 0, *scores(generate(attacker, 32))]]
    others = split.x_test[split.y_test != cfg.target][:32]
    rows.append(["real images of other classes (reference)", 0, *scores(others)])
    start = time.perf_counter()
    for round_ in range(1, cfg.rounds + 1):
        updates = [client_update(model, x[i], y[i], plain, setup, epochs=1, batch_size=32) for i in honest]
        updates.append(dmgan_update(attacker, model, x[own], y[own], setup, epochs=1, batch_size=32))
        with torch.no_grad():
            for k, p in enumerate(trainable_parameters(model)):
                p -= setup.lr * sum(u.gradients[k] for u in updates) / len(updates)
        if round_ % 5 == 0 or round_ == cfg.rounds:
            rows.append([f"after round {round_}", round(time.perf_counter() - start), *scores(generate(attacker, 32))])
    rows.append(["real target images (reference)", 0, *scores(split.x_train[y == cfg.target][:32])])
    return rows


TABLES = {
    1: (
        "Leakage against local steps (digits, batches of 5; recovered: PSNR ≥ 25 dB)",
        leakage_vs_steps,
        ["local steps", "mechanism", "attack", "images", "PSNR (dB)", "recovered", "label acc.", "seconds"],
    ),
    2: (
        "Dimitrov et al.'s setting: 10 epochs x 10 batches x 5 digits, no defense",
        femnist_setting,
        ["victim", "attack", "images", "PSNR (dB)", "recovered (≥ 25 dB)", "certified", "label acc.", "seconds"],
    ),
    3: (
        "DMGAN: a malicious client's generator for a class it lacks",
        dmgan,
        ["generator", "seconds", "nearest real target SSIM", "held-out classifier's confidence in the target"],
    ),
}


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    utils.print_measured_tables(TABLES, cfg.tables, cfg)


if __name__ == "__main__":
    utils.run_cli(main)
