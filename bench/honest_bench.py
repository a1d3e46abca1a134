"""Benchmark of the honest server's batch attacks (issue #14), printed as Markdown tables:

1. fc-peel on the honest fcnn (1024 hidden units) at its initial weights and after honest training (Adam, 5
   epochs on the training split, as attacks.malicious.honest_training), digits and faces, B = 16 to 128:
   the certified share of the batch (readouts that passed the single-sample check and are, by the ground
   truth, within 1e-2 of a distinct original), certified readouts that are no sample (not within 5e-2 of a
   distinct original: must be 0), the share at PSNR >= 30 dB, and seconds per batch on this CPU;
2. CPA (FastICA) beside fc-peel on the fcnn at initialisation, B = 64 and 256 (faces has 200 images: B = 64 only);
3. fc-peel on the honest cnn trained on faces, B = 8: the FC layer's features read exactly, then inverted;
4. label counts at B = 128 on digits: count accuracy (sum_c min(n̂_c, n_c) / B) from the last layer's
   gradient alone and with fc-peel's readouts giving the batch's mean prediction;
5. fc-peel under dp-sgd:8, noise:1e-3 and topk:0.1 (fcnn at initialisation, digits, B = 16), beside the
   adaptive readout of one sample (fc-readout, B = 1: the rank-one fit over every neuron, on the shared entries);
6. the degrees of the fcnn's hidden neurons (how many samples fire each) at initialisation and trained: why
   a trained layer resists peeling.

Batches are seeded draws from the training split (digits: the test split for trained victims, which trained
on the training split); the attacks see only the model and the SharedUpdate, the scoring here the originals.

    uv run python bench/honest_bench.py                 # every table (~25 min on 2 CPU cores)
    uv run python bench/honest_bench.py --tables 1 --draws 1
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from attacks import ATTACKS  # noqa: E402
from attacks.labels import recover_labels  # noqa: E402
from attacks.malicious import honest_training  # noqa: E402
from attacks.readout import layer_inputs, on_cpu, read_update  # noqa: E402
from data_sources import load_dataset  # noqa: E402
from defenses import ClientSetup, client_update, parse_mechanisms  # noqa: E402
from metrics import count_accuracy, reconstruction_scores  # noqa: E402
from models import create_model  # noqa: E402
from privacy import noise_multiplier_for  # noqa: E402


@dataclass
class BenchConfig:
    draws: int = 3  # seeded batch draws per cell
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128)
    inversion_steps: int = 3000  # table 3: Adam steps of the feature inversion (1000: 20.7 dB, not converged)
    tables: tuple[int, ...] = (1, 2, 3, 4, 5, 6)


@functools.cache
def victim(architecture: str, dataset: str, trained: bool) -> torch.nn.Module:
    split = load_dataset(dataset)
    torch.manual_seed(0)
    model = create_model(architecture, split.input_shape, split.num_classes)
    return honest_training(model, split, 5, 0) if trained else model.eval()


def batch(dataset: str, size: int, seed: int, trained: bool) -> tuple[torch.Tensor, torch.Tensor]:
    split = load_dataset(dataset)
    x, y = (split.x_test, split.y_test) if trained and dataset == "digits" else (split.x_train, split.y_train)
    if dataset == "faces":  # 200 images: attack any of them (a trained victim has seen its training split)
        x, y = torch.cat([split.x_train, split.x_test]), torch.cat([split.y_train, split.y_test])
    pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:size]
    return x[pick], y[pick]


def attack(name: str, model, images, labels, mechanism: str = "none", steps: int = 1, setup=None) -> dict:
    """One batch through the client and the attack: certified and wrong-certified counts, PSNR, seconds."""
    shape, classes = tuple(images.shape[1:]), int(model(images[:1]).shape[1])
    update = client_update(model, images, labels, parse_mechanisms([mechanism])[0], setup or ClientSetup())
    cfg = SimpleNamespace(seed=0, inversion_steps=steps, inversion_gradient_weight=0.1, inversion_restarts=1,
                          log_every=steps)  # fmt: skip
    start = time.perf_counter()
    rec = ATTACKS[name].run(model, update, shape, classes, cfg, lambda *a: None)
    seconds = time.perf_counter() - start
    read = rec.features if rec.features is not None else rec.images.flatten(1)
    true = layer_inputs(model, images)
    distance = torch.cdist(read[: rec.exact].double(), true.double(), p=float("inf"))
    hits = distance.amin(1) <= 1e-2 * true.abs().max()  # pixels within 0.01: PSNR above 40 dB
    correct = len(set(distance.argmin(1)[hits].tolist()))
    near = distance.amin(1) <= 5e-2 * true.abs().max()  # a sample, read less precisely (a confident one)
    wrong = rec.exact - len(set(distance.argmin(1)[near].tolist()))
    psnr = np.array(reconstruction_scores(images, rec.images)["psnr"])
    return {"certified": correct / len(images), "wrong": wrong, "recovered": (psnr >= 30).mean(),
            "psnr": float(np.median(psnr)), "seconds": seconds}  # fmt: skip


def mean_of(runs: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def peel_fcnn(root: Path, cfg: BenchConfig) -> list[list]:
    rows = []
    for trained in (False, True):
        for dataset in ("digits", "faces"):
            model = victim("fcnn", dataset, trained)
            for size in cfg.batch_sizes:
                m = mean_of([attack("fc-peel", model, *batch(dataset, size, s, trained)) for s in range(cfg.draws)])
                rows.append(["trained" if trained else "init", dataset, size, cfg.draws, m["certified"],
                             int(m["wrong"] * cfg.draws), m["recovered"], m["seconds"]])  # fmt: skip
                print(*rows[-1], file=sys.stderr, flush=True)
    return rows


def cpa_beside_peel(root: Path, cfg: BenchConfig) -> list[list]:
    rows = []
    for dataset, size in [("digits", 64), ("faces", 64), ("digits", 256)]:
        model = victim("fcnn", dataset, False)
        images, labels = batch(dataset, size, 0, False)
        for name in ("cpa", "fc-peel"):
            r = attack(name, model, images, labels)
            rows.append([dataset, size, name, r["certified"], r["recovered"], r["psnr"], r["seconds"]])
            print(*rows[-1], file=sys.stderr, flush=True)
    return rows


def peel_cnn(root: Path, cfg: BenchConfig) -> list[list]:
    model = victim("cnn", "faces", True)
    runs = [attack("fc-peel", model, *batch("faces", 8, s, True), steps=cfg.inversion_steps) for s in range(cfg.draws)]
    m = mean_of(runs)
    return [["cnn (trained, faces)", 8, cfg.draws, m["certified"], m["psnr"], m["recovered"], m["seconds"]]]


def label_counts(root: Path, cfg: BenchConfig) -> list[list]:
    rows = []
    split = load_dataset("digits")
    for trained in (False, True):
        model = victim("fcnn", "digits", trained)
        alone, peeled = [], []
        for seed in range(cfg.draws):
            images, labels = batch("digits", 128, seed, trained)
            update = client_update(model, images, labels, parse_mechanisms(["none"])[0], ClientSetup())
            cpu_model, cpu_update = on_cpu(model, update)
            readout = read_update(cpu_model, cpu_update, split.input_shape, 10, rounds=128, factorise=True)
            for out, read in ((alone, None), (peeled, readout.inputs[: readout.exact])):
                counted = recover_labels(cpu_model, cpu_update, split.input_shape, 128, 0, read)
                out.append(count_accuracy(counted, labels, 10))
        rows.append(["trained" if trained else "init", 128, cfg.draws, np.mean(alone), np.mean(peeled)])
    return rows


def defenses(root: Path, cfg: BenchConfig) -> list[list]:
    split = load_dataset("digits")
    model = victim("fcnn", "digits", False)
    rate = 32 / len(split.x_train)
    z = noise_multiplier_for(8.0, 1e-5, rate, 15 * int(1 / rate))  # the training study's sampling, ε = 8
    rows = []
    for mechanism in ("none", "dp-sgd:8", "noise:1e-3", "topk:0.1"):
        setup = ClientSetup(max_grad_norm=1.0, noise_multiplier=z) if mechanism.startswith("dp") else None
        for name, size in (("fc-peel", 16), ("fc-readout", 1)):  # fc-readout: the adaptive fit over all neurons
            m = mean_of([attack(name, model, *batch("digits", size, s, False), mechanism, setup=setup)
                         for s in range(cfg.draws)])  # fmt: skip
            rows.append([mechanism, name, size, cfg.draws, m["certified"], int(m["wrong"] * cfg.draws),
                         m["recovered"], m["psnr"]])  # fmt: skip
    return rows


def degrees(root: Path, cfg: BenchConfig) -> list[list]:
    """Why a trained layer resists peeling, by the ground truth of draw 0: how many of the 1024 neurons no
    sample fires, one sample fires (and how many samples own such a neuron), all samples but one fire (and
    their owners), and every sample fires (the complement needs more than C of these); and the median and
    smallest |p - y| of the batch, the scale of a sample's gradient."""
    rows = []
    for trained in (False, True):
        for dataset in ("digits", "faces"):
            model = victim("fcnn", dataset, trained)
            for size in cfg.batch_sizes:
                images, labels = batch(dataset, size, 0, trained)
                with torch.no_grad():
                    fire = model.fc(images.flatten(1)) > 0
                    probs = model(images).softmax(1)
                error = (probs - torch.nn.functional.one_hot(labels, probs.shape[1])).norm(dim=1)
                count = fire.sum(0)
                lone, all_but_one = count == 1, count == size - 1
                rows.append(["trained" if trained else "init", dataset, size, int((count == 0).sum()),
                             int(lone.sum()), int(fire[:, lone].any(1).sum()), int(all_but_one.sum()),
                             int((~fire[:, all_but_one]).any(1).sum()), int((count == size).sum()),
                             f"{float(error.median()):.1e}", f"{float(error.min()):.1e}"])  # fmt: skip
    return rows


TABLES = {
    1: ("fc-peel on the honest fcnn (1024 hidden units)", peel_fcnn,
        ["weights", "dataset", "B", "draws", "certified exact", "certified but wrong", "PSNR ≥ 30 dB", "s / batch"]),
    2: ("CPA (FastICA) beside fc-peel, fcnn at initialisation, one draw", cpa_beside_peel,
        ["dataset", "B", "attack", "certified exact", "PSNR ≥ 30 dB", "median PSNR (dB)", "s / batch"]),
    3: ("fc-peel on the honest cnn trained on faces: features read, then inverted", peel_cnn,
        ["victim", "B", "draws", "certified features", "median PSNR (dB)", "PSNR ≥ 30 dB", "s / batch"]),
    4: ("Label counts at B = 128 on digits (fcnn)", label_counts,
        ["weights", "B", "draws", "count accuracy, gradient alone", "count accuracy, with fc-peel's readouts"]),
    5: ("fc-peel under the defenses (fcnn at initialisation, digits)", defenses,
        ["mechanism", "attack", "B", "draws", "certified exact", "certified but wrong", "PSNR ≥ 30 dB",
         "median PSNR (dB)"]),
    6: ("Degrees of the fcnn's hidden neurons (draw 0)", degrees,
        ["weights", "dataset", "B", "dead", "one sample", "its owners", "all but one", "their owners",
         "all samples", "median abs(p - y)", "smallest"]),
}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    cfg = tyro.cli(BenchConfig)
    utils.print_measured_tables(TABLES, cfg.tables, cfg)


if __name__ == "__main__":
    utils.run_cli(main)
