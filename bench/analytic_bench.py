"""Benchmark of the malicious-server attacks: mean PSNR of the matched reconstructions, recovered fraction
(PSNR >= 30 dB), exact readouts and seconds per batch on this machine, per dataset, batch size, attack and
mechanism. Prints three Markdown tables: the attacks without a defense, averaged over several seeded batch
draws (the recovered fraction of RtF is a random quantity; one draw says little about its expectation),
the mechanisms on one draw, and RtF's recovered fraction by K and B for one statistic and for the
design the attack picks.

Attacks: GIAvMP on fcnn; RtF (K = 128 neurons over the random statistics --rtf-measurements 0 picks for
each batch size, Gaussian-fitted thresholds) in front of fcnn; GIAvMP on cnn-wide (features read exactly,
then inverted; B = 16 and one draw only, the inversion costs under a second per image on a CPU). Victim and
auxiliary data are disjoint: digits attacks batches from its test split and fits on its training split;
faces (200 images) attacks a seeded draw of B images and fits on the other 200 - B.

    uv run python bench/analytic_bench.py [--quick]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import malicious  # noqa: E402
from config import AttackConfig  # noqa: E402
from data_sources import DataOptions, load_dataset  # noqa: E402
from defenses import ClientSetup, MechanismSpec, client_update, parse_mechanisms  # noqa: E402
from metrics import reconstruction_scores  # noqa: E402
from models import create_model  # noqa: E402
from privacy import noise_multiplier_for  # noqa: E402
from utils import markdown_table  # noqa: E402

BATCH_SIZES = [16, 32, 64, 128]
MECHANISMS = ["dp-sgd:8", "noise:1e-4", "noise:1e-3", "prune:0.2", "quantize:4", "topk:0.1"]
SEED_PSNR = {16: 67.0, 32: 59.0, 64: 44.4, 128: 25.9}  # GIAvMP's FCNN table on CIFAR-10 (seed study)
RTF_BINS = 128
RTF_SWEEP = [64, 128, 256]  # K in the RtF table by K and B
DRAWS = 5  # seeded batch draws averaged per cell without a defense
CNN_MAX_BATCH = 16
CNN_STEPS = 300


def victim_and_aux(name: str, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    split = load_dataset(name, DataOptions())
    if name == "digits":
        pick = torch.randperm(len(split.x_test), generator=torch.Generator().manual_seed(seed))[:batch_size]
        return split.x_test[pick], split.y_test[pick], split.x_train
    images, labels = torch.cat([split.x_train, split.x_test]), torch.cat([split.y_train, split.y_test])
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images[order[:batch_size]], labels[order[:batch_size]], images[order[batch_size:]]


def dp_setup(epsilon: float, num_train: int) -> ClientSetup:
    """The training study's sampling set-up (batch 32, 30 epochs, δ = 1e-5), as gradient_attack.py uses."""
    rate = 32 / num_train
    steps = 30 * int(1 / rate)
    return ClientSetup(max_grad_norm=1.0, noise_multiplier=noise_multiplier_for(epsilon, 1e-5, rate, steps))


def servers(dataset: str, batch_size: int, aux: torch.Tensor, shape: tuple[int, ...], seed: int, cache: Path):
    """The models each attack sends, built from the auxiliary images only."""
    classes = 10 if dataset == "digits" else 2
    torch.manual_seed(seed)
    fcnn = create_model("fcnn", shape, classes)
    statistics = malicious.best_measurement_count(RTF_BINS, [batch_size])  # what --rtf-measurements 0 picks
    sent = {
        "giavmp": malicious.giavmp_model(fcnn, aux, batch_size, 4, seed, cache),
        "rtf": malicious.rtf_model(fcnn, aux, RTF_BINS, "random", seed, "gaussian", statistics),
    }
    if batch_size <= CNN_MAX_BATCH and seed == 0:
        cnn = create_model("cnn-wide", shape, classes)
        sent["giavmp-cnn"] = malicious.giavmp_model(cnn, aux, batch_size, 4, seed, cache)
    return sent, classes


def attack_once(model, images, labels, mech: MechanismSpec, setup: ClientSetup, classes: int) -> dict[str, float]:
    """One batch through the client and the server: PSNR, recovered fraction, exact readouts, seconds."""
    shape = tuple(images.shape[1:])
    update = client_update(model, images, labels, mech, setup)
    cfg = AttackConfig(inversion_steps=CNN_STEPS, log_every=CNN_STEPS)
    readout = malicious.read_sent(model, update, shape, classes)
    start = time.perf_counter()
    recs = malicious.run_malicious(model, update, shape, classes, cfg, lambda *a: None).images
    seconds = time.perf_counter() - start
    scores = reconstruction_scores(images, recs)
    psnr = np.array(scores["psnr"])
    return {"psnr": psnr.mean(), "ssim": np.mean(scores["ssim"]), "recovered": (psnr >= 30).mean(),
            "exact": readout.exact, "seconds": seconds}  # fmt: skip


def rtf_sweep(batch_sizes: list[int], draws: int) -> list[list]:
    """RtF's recovered fraction by K and B, one statistic against the design --rtf-measurements 0 picks for
    that K and B, next to the uniform-binning expectation (1 - 1/K)^(B - 1)."""
    none = parse_mechanisms(["none"])[0]
    rows = []
    for dataset in ["digits", "faces"]:
        for bins in RTF_SWEEP:
            for batch_size in batch_sizes:
                count = malicious.best_measurement_count(bins, [batch_size])
                recovered: dict[int, list[float]] = {1: [], count: []}
                for seed in range(draws):
                    images, labels, aux = victim_and_aux(dataset, batch_size, seed)
                    torch.manual_seed(seed)
                    fcnn = create_model("fcnn", tuple(images.shape[1:]), 10 if dataset == "digits" else 2)
                    for m in recovered:
                        sent = malicious.rtf_model(fcnn, aux, bins, "random", seed, "gaussian", m)
                        result = attack_once(
                            sent, images, labels, none, ClientSetup(), 10 if dataset == "digits" else 2
                        )
                        recovered[m].append(result["recovered"])
                expected = (1 - 1 / bins) ** (batch_size - 1)
                rows.append([dataset, bins, batch_size, draws, np.mean(recovered[1]), count, np.mean(recovered[count]),
                             expected])  # fmt: skip
                print(*rows[-1], flush=True, file=sys.stderr)
    return rows


def main() -> None:
    torch.set_num_threads(1)  # small ops: one thread is faster, and several times so on a shared CPU
    quick = "--quick" in sys.argv
    mechanisms = parse_mechanisms(MECHANISMS[:1] if quick else MECHANISMS)
    batch_sizes = BATCH_SIZES[::3] if quick else BATCH_SIZES
    draws = 2 if quick else DRAWS
    none = parse_mechanisms(["none"])[0]
    cache = Path(tempfile.mkdtemp())
    clean, defended = [], []
    for dataset in ["digits", "faces"]:
        for batch_size in batch_sizes:
            results: dict[str, list[dict[str, float]]] = {}
            for seed in range(draws):
                images, labels, aux = victim_and_aux(dataset, batch_size, seed)
                sent, classes = servers(dataset, batch_size, aux, tuple(images.shape[1:]), seed, cache)
                for attack, model in sent.items():
                    results.setdefault(attack, []).append(
                        attack_once(model, images, labels, none, ClientSetup(), classes)
                    )
                    for mech in mechanisms if seed == 0 and attack != "giavmp-cnn" else []:
                        setup = dp_setup(mech.strength, len(aux)) if mech.name == "dp-sgd" else ClientSetup()
                        r = attack_once(model, images, labels, mech, setup, classes)
                        defended.append([dataset, attack, batch_size, mech.spec, r["psnr"], r["recovered"],
                                         r["exact"], r["seconds"]])  # fmt: skip
            for attack, runs in results.items():
                mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
                expected = (1 - 1 / RTF_BINS) ** (batch_size - 1) if attack.startswith("rtf") else None
                seed_psnr = SEED_PSNR[batch_size] if attack == "giavmp" else None
                clean.append([dataset, attack, batch_size, len(runs), mean["psnr"], seed_psnr, mean["ssim"],
                              mean["recovered"], expected, mean["exact"], mean["seconds"]])  # fmt: skip
                print(*clean[-1][:9], flush=True, file=sys.stderr)
    header = ["dataset", "attack", "B", "draws", "PSNR (dB)", "seed PSNR", "SSIM", "recovered", "RtF expected",
              "exact", "s/batch"]  # fmt: skip
    print("Without a defense (mean over seeded batch draws):\n")
    print(markdown_table(header, clean))
    print("Under the mechanisms (draw 0):\n")
    print(
        markdown_table(["dataset", "attack", "B", "mechanism", "PSNR (dB)", "recovered", "exact", "s/batch"], defended)
    )
    print("RtF recovered fraction by K and B (mean over seeded batch draws):\n")
    header = ["dataset", "K", "B", "draws", "1 statistic", "statistics chosen", "chosen design", "(1 - 1/K)^(B - 1)"]
    print(markdown_table(header, rtf_sweep(batch_sizes, draws)))


if __name__ == "__main__":
    main()
