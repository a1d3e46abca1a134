"""Benchmark of the generative-prior attacks' goals (issue #13), printed as Markdown tables; LeNet on digits:

1. batch 1 under each default gradient defense and regularized: mean SSIM of GGL against the adaptive DLG and
   Inverting Gradients, through `gradient_attack.py` (the generator trained on the auxiliary split as a user's
   run trains it);
2. GRNN at batch 4 against DLG and IG given the same wall-clock time: GRNN runs its default 1000 steps, then DLG
   and IG run as many iterations as their measured rate fits into the seconds GRNN took;
3. the generator's training time on the auxiliary split, and the cached generator's reuse;
4. the defenses that stop DLG on this victim (README, "where each defense starts to protect"), against GGL;
5. what the label alone gives GGL: its generator's image at the latent prior's mean for the victim's label,
   scored like a reconstruction (the floor a class-conditional prior sets before any gradient is matched).

    uv run python bench/generative_bench.py                 # everything (~40 min on 2 busy CPU cores)
    uv run python bench/generative_bench.py --tables 2 3    # some of the tables
    uv run python bench/generative_bench.py --quick         # 1 image and few steps, to check it runs
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402
import gradient_attack  # noqa: E402
import utils  # noqa: E402
from attacks import ATTACKS  # noqa: E402
from attacks.generative import LATENT, learn_ggl  # noqa: E402
from data_sources import load_dataset  # noqa: E402
from defenses import ClientSetup, MechanismSpec, client_update  # noqa: E402
from leakage import aux_data  # noqa: E402
from metrics import image_scores, reconstruction_scores  # noqa: E402
from models import create_model  # noqa: E402

DEFENSES = ["noise:0.01", "prune:0.2", "quantize:4", "topk:0.1", "regularized"]
STOPS_DLG = ["noise:0.1", "prune:0.95", "topk:0.01", "quantize:2", "dp-sgd:50"]  # DLG's breaking points (README)


@dataclass
class BenchConfig:
    images: int = 3  # images attacked one at a time in tables 1 and 4
    grnn_batches: int = 1  # batches of 4 in table 2
    quick: bool = False  # 1 image and a tenth of the steps: a smoke run
    tables: tuple[int, ...] = (1, 2, 3, 4, 5)
    cache_dir: Path | None = None  # where tables 3 and 5 keep the generator (default: the scratch directory)


def study(root: Path, cfg: BenchConfig, attacks: list[str], mechanisms: list[str]) -> dict[tuple[str, str], dict]:
    """gradient_attack.py on the fresh LeNet on digits; the summary row of each (attack, mechanism)."""
    out = root / "attack"
    steps = ["--iterations", "10", "--generator-epochs", "2"] if cfg.quick else []
    gradient_attack.main(
        ["--model", "lenet", "--dataset", "digits", "--out", str(out), "--cache-dir", str(root / "cache"),
         "--num-images", str(cfg.images), "--attacks", *attacks, "--mechanisms", *mechanisms, *steps]
    )  # fmt: skip
    return {(r["attack"], r["mechanism"]): r for r in utils.read_csv(out / "summary.csv")}


def ggl_against_pixels(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 1."""
    rows = study(root, cfg, ["ggl", "dlg", "ig"], ["none", *DEFENSES])
    table = []
    for mech in ["none", *DEFENSES]:
        ggl, dlg, ig = (float(rows[a, mech]["ssim"]) for a in ("ggl", "dlg", "ig"))
        verdict = "yes" if ggl >= max(dlg, ig) else ("no, but recognisable" if ggl >= 0.5 else "no")
        seconds = float(rows["ggl", mech]["seconds"]) / cfg.images
        table.append([mech, ggl, dlg, ig, float(rows["ggl", mech]["psnr"]), verdict, seconds])
    return table


def timed(attack: str, model, update, shape, iterations: int, seed: int) -> tuple[object, float]:
    attack_cfg = SimpleNamespace(seed=seed, restarts=1, iterations=iterations, log_every=max(1, iterations))
    start = time.perf_counter()
    rec = ATTACKS[attack].run(model, update, shape, 10, attack_cfg, lambda *a: None)
    return rec, time.perf_counter() - start


def grnn_same_budget(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 2: per batch, GRNN's seconds set the budget; DLG's and IG's rates (from 5 timed iterations)
    turn it into their iterations."""
    split = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model("lenet", split.input_shape, split.num_classes)
    order = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(0))
    scores: dict[str, list] = {a: [] for a in ("grnn", "dlg", "ig")}
    for batch in range(cfg.grnn_batches):
        picks = order[4 * batch : 4 * batch + 4]
        x, y = split.x_train[picks], split.y_train[picks]
        update = client_update(model, x, y, MechanismSpec("none", None), ClientSetup(seed=batch))
        budget = None
        for attack in ("grnn", "dlg", "ig"):
            if budget is None:
                iterations = 100 if cfg.quick else ATTACKS["grnn"].default_iterations
            else:
                iterations = max(1, round(budget * 5 / timed(attack, model, update, split.input_shape, 5, batch)[1]))
            rec, seconds = timed(attack, model, update, split.input_shape, iterations, batch)
            budget = budget or seconds
            s = reconstruction_scores(x, rec.images)
            hits = (np.sort(rec.labels.numpy()) == np.sort(y.numpy())).mean()
            scores[attack].append([iterations, seconds, np.mean(s["psnr"]), np.mean(s["ssim"]), hits])
    return [[a, *np.mean(v, axis=0)] for a, v in scores.items()]


def study_generator(root: Path, cfg: BenchConfig):
    """The victims the study draws, the auxiliary split it leaves, and the config ggl learns with."""
    split = load_dataset("digits")
    victims = torch.randperm(len(split.x_train), generator=torch.Generator().manual_seed(0))[: cfg.images]
    attack_cfg = dataclasses.replace(config.AttackConfig(), cache_dir=cfg.cache_dir or root / "cache3")
    if cfg.quick:
        attack_cfg.generator_epochs = 2
    return split, victims, aux_data(split, victims.tolist()), attack_cfg


def generator_cost(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 3: learn_ggl on the study's auxiliary split twice: training and caching, then reading the cache."""
    _, _, aux, attack_cfg = study_generator(root, cfg)
    rows = []
    for step in ("train and cache", "reuse the cache"):
        start, cpu = time.perf_counter(), time.process_time()
        learn_ggl(aux, attack_cfg)
        rows.append([step, len(aux.x_train), attack_cfg.generator_epochs, time.perf_counter() - start,
                     time.process_time() - cpu])  # fmt: skip
    return rows


def label_only(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 5: per victim image, the generator's image for its label at z = 0."""
    split, victims, aux, attack_cfg = study_generator(root, cfg)
    generator = learn_ggl(aux, attack_cfg).keywords["generator"]
    x, y = split.x_train[victims], split.y_train[victims]
    with torch.no_grad():
        images = generator(torch.cat([torch.zeros(len(y), LATENT), F.one_hot(y, split.num_classes).float()], 1))
    rows = []
    for victim, original, label, image in zip(victims.tolist(), x, y.tolist(), images, strict=True):
        scores = image_scores(original, image)
        rows.append([victim, label, scores["ssim"], scores["psnr"]])
    return rows


def breaking_points(root: Path, cfg: BenchConfig) -> list[list]:
    """Table 4."""
    rows = study(root, cfg, ["ggl", "dlg"], STOPS_DLG)
    table = []
    for mech in STOPS_DLG:
        ggl, dlg = float(rows["ggl", mech]["ssim"]), float(rows["dlg", mech]["ssim"])
        table.append([mech, dlg, ggl, float(rows["ggl", mech]["psnr"]), "yes" if ggl >= 0.5 else "no"])
    return table


TABLES = {
    1: ("GGL against the adaptive DLG and IG, LeNet on digits, batch 1 (mean over the images)",
        ggl_against_pixels,
        ["mechanism", "GGL SSIM", "DLG SSIM", "IG SSIM", "GGL PSNR (dB)", "GGL ≥ both", "GGL s/image"]),
    2: ("GRNN against DLG and IG at batch 4, the same seconds each (mean over the batches)",
        grnn_same_budget,
        ["attack", "iterations", "seconds", "mean PSNR (dB)", "mean SSIM", "label accuracy"]),
    3: ("GGL's generator on the auxiliary split (digits without the victims' images)",
        generator_cost,
        ["step", "auxiliary images", "epochs", "seconds", "CPU seconds"]),
    4: ("Defenses that stop DLG (SSIM < 0.5), against GGL, batch 1",
        breaking_points,
        ["defense", "DLG SSIM", "GGL SSIM", "GGL PSNR (dB)", "GGL still recognisable"]),
    5: ("The label alone: GGL's generator at the prior's mean for each victim's label, no gradient matched",
        label_only,
        ["victim index", "label", "SSIM", "PSNR (dB)"]),
}  # fmt: skip


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    if cfg.quick:
        cfg.images = 1
    torch.set_num_threads(1)
    utils.print_measured_tables(TABLES, cfg.tables, cfg)


if __name__ == "__main__":
    utils.run_cli(main)
