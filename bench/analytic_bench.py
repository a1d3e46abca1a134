"""Benchmark of the malicious-server attacks (GIAvMP on fcnn, RtF on fcnn): mean PSNR of the matched
reconstructions, recovered fraction (PSNR >= 30 dB), exact readouts and seconds per batch on this machine,
per dataset, batch size and mechanism. Prints a Markdown table.

Victim and auxiliary data are disjoint: digits attacks batches from its test split and fits on its
training split; faces (200 images) attacks a seeded draw of B images and fits on the other 200 - B.

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

from attacks import analytic  # noqa: E402
from data_sources import DataOptions, load_dataset  # noqa: E402
from defenses import ClientSetup, client_update, parse_mechanisms  # noqa: E402
from metrics import reconstruction_scores  # noqa: E402
from models import create_model  # noqa: E402
from privacy import noise_multiplier_for  # noqa: E402
from utils import markdown_table  # noqa: E402

BATCH_SIZES = [16, 32, 64, 128]
MECHANISMS = ["none", "dp-sgd:8", "noise:1e-4", "noise:1e-3", "prune:0.2", "quantize:4", "topk:0.1"]
SEED_PSNR = {16: 67.0, 32: 59.0, 64: 44.4, 128: 25.9}  # GIAvMP's FCNN table on CIFAR-10 (seed study)
RTF_BINS = 128


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


def main() -> None:
    torch.set_num_threads(2)
    quick = "--quick" in sys.argv
    mechanisms = parse_mechanisms(MECHANISMS[:2] if quick else MECHANISMS)
    batch_sizes = BATCH_SIZES[::3] if quick else BATCH_SIZES
    cache = Path(tempfile.mkdtemp())
    rows = []
    for dataset in ["digits", "faces"]:
        for batch_size in batch_sizes:
            images, labels, aux = victim_and_aux(dataset, batch_size, seed=0)
            shape = tuple(images.shape[1:])
            classes = 10 if dataset == "digits" else 2
            torch.manual_seed(0)
            honest = create_model("fcnn", shape, classes)
            start = time.perf_counter()
            sent = {
                "giavmp": analytic.giavmp_model(honest, aux, batch_size, 4, 0, cache),
                "rtf": analytic.rtf_model(honest, aux, RTF_BINS, "random", 0),
            }
            fit_seconds = time.perf_counter() - start
            for attack, model in sent.items():
                for mech in mechanisms:
                    setup = dp_setup(mech.strength, len(aux)) if mech.name == "dp-sgd" else ClientSetup()
                    update = client_update(model, images, labels, mech, setup)
                    start = time.perf_counter()
                    readout = analytic.read_update(model, update, shape, classes)
                    recs, _ = analytic.readout_images(readout, batch_size, shape)
                    seconds = time.perf_counter() - start
                    psnr = np.array(reconstruction_scores(images, recs)["psnr"])
                    expected = (1 - 1 / RTF_BINS) ** (batch_size - 1) if attack == "rtf" else None
                    rows.append(
                        [dataset, attack, batch_size, mech.spec, float(psnr.mean()), float((psnr >= 30).mean()),
                         expected, readout.exact, readout.collisions, SEED_PSNR[batch_size] if attack == "giavmp"
                         else None, seconds, fit_seconds if attack == "giavmp" else None]
                    )  # fmt: skip
                    print(*rows[-1][:6], flush=True, file=sys.stderr)
    header = ["dataset", "attack", "B", "mechanism", "PSNR (dB)", "recovered", "RtF expected", "exact",
              "collisions", "seed PSNR", "s/batch", "fit s"]  # fmt: skip
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
