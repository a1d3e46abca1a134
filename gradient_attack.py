"""The leakage study: how much of a client's private batch can a server rebuild from what the client shares?

    uv run gradient_attack.py                                   # LeNet on digits, 8 mechanisms, DLG
    uv run gradient_attack.py --attacks dlg idlg --mechanisms none noise:1e-4,1e-3,1e-2 --batch-sizes 1 2 4
    uv run gradient_attack.py --from-run runs/train/digits-lenet-dp-sgd-eps8 --mechanisms dp-sgd none
    uv run gradient_attack.py --dataset photos --images my_photo.png --mechanisms none --attacks dlg idlg

The grid is attacks x mechanisms (sweeps expanded) x batch sizes; each cell is one run in runs/attack/<run>/
(config.json, trajectory.csv, snapshots.npz, reconstruction.png, metrics.json last) and one row of
runs/attack/summary.csv. The client side (defenses.client_update) sees the private batch; the attack sees
only the model and the SharedUpdate; the scoring here compares what the attack reports to the originals.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from tqdm import tqdm

import config
import utils
from attacks import ATTACKS, Observer, Reconstruction
from attacks.malicious import detect_poisoning
from data_sources import DataOptions, DataSplit, load_dataset, load_image_files
from defenses import ClientSetup, MechanismSpec, client_update, parse_mechanisms
from metrics import reconstruction_scores
from models import FrozenBackbone, create_model, load_checkpoint
from privacy import epsilon_spent, noise_multiplier_for, poisson_schedule

SUMMARY_COLUMNS = [
    "run", "victim", "dataset", "attack", "mechanism", "mechanism_name", "strength", "epsilon", "batch_size",
    "num_images", "iterations", "restarts", "loss", "mse", "psnr", "ssim", "mse_std", "psnr_std", "ssim_std",
    "label_accuracy", "success_rate", "recovered_fraction", "seconds", "seed",
    "honest_accuracy", "received_accuracy", "poisoning_detected",
]  # fmt: skip
DETECTION_COLUMNS = SUMMARY_COLUMNS[-3:]  # the client's check of a malicious server's model (giavmp, rtf)
RECOVERED_PSNR = 30.0  # dB from which an image counts as recovered (recovered_fraction)
TRAIN_RUN_FILES = ("config.json", "metrics.json", "model.safetensors")


@dataclass
class Victim:
    """The client's model and training set-up: a fresh architecture, or a train.py run."""

    name: str  # the architecture, or the train.py run's directory name
    architecture: str
    model: nn.Module
    dataset: str
    training: dict[str, Any]  # TrainConfig fields the client trained (or would train) with
    noise_multiplier: float | None  # the DP run's own z, for `dp-sgd` without an ε
    epsilon: float | None


@dataclass
class PrivateData:
    """The private images (never handed to an attack) and where they came from."""

    images: torch.Tensor
    labels: torch.Tensor
    source: dict[str, Any]  # indices or file names, recorded in config.json
    exclude: list[int]  # training-set indices other clients and auxiliary data must not use


def load_victim(cfg: config.AttackConfig) -> tuple[Victim, DataSplit]:
    """Check --from-run before anything loads, then build the victim model and its dataset."""
    training = dataclasses.asdict(config.TrainConfig())
    if cfg.from_run is None:
        split = load_data(cfg, cfg.dataset, dict(training, seed=cfg.seed, image_size=cfg.image_size))
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, split.input_shape, split.num_classes, pretrained=False)
        return Victim(cfg.model, cfg.model, model, cfg.dataset, training, None, None), split
    run_dir = Path(cfg.from_run)
    missing = [f for f in TRAIN_RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        raise utils.UsageError(
            f"--from-run {run_dir} is not a finished train.py run: it lacks {', '.join(missing)}. Give a directory "
            "such as runs/train/digits-lenet-none written by `uv run train.py` (list them with ls runs/train)."
        )
    run_cfg, run_metrics = utils.read_json(run_dir / "config.json"), utils.read_json(run_dir / "metrics.json")
    if "model" not in run_cfg or "dataset" not in run_cfg:
        raise utils.UsageError(
            f"--from-run {run_dir}: config.json names no model or dataset; was it written by train.py?"
        )
    training.update({k: v for k, v in run_cfg.items() if k in training})
    split = load_data(cfg, run_cfg["dataset"], training)  # the run's own split: its seed, test share and size
    model = create_model(run_cfg["model"], split.input_shape, split.num_classes, pretrained=False)
    if isinstance(model, FrozenBackbone):
        raise utils.UsageError(
            f"--from-run {run_dir} holds a {run_cfg['model']} head on a frozen backbone, whose features are computed "
            "without gradients, so no gradient attack can reach the image; attack a lenet, cnn, mlp or fcnn run."
        )
    load_checkpoint(model, run_dir / "model.safetensors")
    is_dp = run_cfg.get("privacy") == "dp-sgd"
    z = run_metrics.get("noise_multiplier") if is_dp else None
    eps = run_metrics.get("epsilon") if is_dp else None
    return Victim(run_dir.name, run_cfg["model"], model, run_cfg["dataset"], training, z, eps), split


def load_data(cfg: config.AttackConfig, name: str, training: dict[str, Any]) -> DataSplit:
    """The dataset split as `training` (TrainConfig fields) makes it, so a run's training images are found."""
    opts = DataOptions(
        root=cfg.data_root,
        download=cfg.download,
        seed=training["seed"],
        test_fraction=training["test_fraction"],
        image_size=training["image_size"],
    )
    return load_dataset(name, opts)


def private_data(cfg: config.AttackConfig, split: DataSplit, count: int) -> PrivateData:
    """`count` private samples: the user's files, the given indices, or a seeded draw from the training set
    (a prefix of one permutation, so larger runs extend smaller ones)."""
    if cfg.images:
        images = load_image_files(cfg.images, split.input_shape)
        labels = torch.tensor(cfg.labels or [0] * len(images))
        bad = [y for y in labels.tolist() if not 0 <= y < split.num_classes]
        if bad:
            raise utils.UsageError(
                f"--labels {bad} out of range; '{split.name}' has classes 0..{split.num_classes - 1}."
            )
        return PrivateData(images, labels, {"images": [str(p) for p in cfg.images]}, [])
    n = len(split.x_train)
    if cfg.indices:
        bad = [i for i in cfg.indices if not 0 <= i < n]
        if bad:
            raise utils.UsageError(f"--indices {bad} out of range; '{split.name}' has training indices 0..{n - 1}.")
        indices = list(cfg.indices)
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))[:count].tolist()
    return PrivateData(split.x_train[indices], split.y_train[indices], {"indices": indices}, indices)


def images_per_run(cfg: config.AttackConfig, batch_size: int, available: int) -> int:
    """Whole batches only: a drawn set grows to a multiple of the batch size; a fixed set must divide."""
    fixed = len(cfg.images) or len(cfg.indices)
    if fixed:
        if fixed % batch_size:
            raise utils.UsageError(
                f"batch size {batch_size} does not divide the {fixed} given images; give a multiple of it or drop it."
            )
        return fixed
    count = math.ceil(cfg.num_images / batch_size) * batch_size
    if count > available:
        raise utils.UsageError(
            f"batch size {batch_size} needs {count} images but the training set has {available}; use a smaller one."
        )
    return count


def client_setup(victim: Victim, mech: MechanismSpec, num_train: int, seed: int) -> tuple[ClientSetup, float | None]:
    """The set-up the client shares with: for dp-sgd:EPS the accountant's noise multiplier for ε = EPS under the
    training study's sampling (privacy.poisson_schedule, as Opacus sets it up), so larger ε means less noise; plain
    `dp-sgd` uses the DP run's own. Returns the set-up and the accountant's ε (None without DP)."""
    t = victim.training
    kappa = (t["lr"] * t["reg_sigma"]) ** 2
    base = ClientSetup(max_grad_norm=t["max_grad_norm"], lr=t["lr"], kappa=kappa, seed=seed)
    if mech.name != "dp-sgd":
        return base, None
    if mech.strength is None:
        return dataclasses.replace(base, noise_multiplier=victim.noise_multiplier), victim.epsilon
    sample_rate, steps = poisson_schedule(num_train, t["batch_size"], t["epochs"])
    with warnings.catch_warnings():  # the search probes tiny multipliers, past RDP's alpha range: harmless
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        z = noise_multiplier_for(mech.strength, t["delta"], sample_rate, steps, t["accountant"])
    return dataclasses.replace(base, noise_multiplier=z), epsilon_spent(
        z, sample_rate, steps, t["delta"], t["accountant"]
    )


def check_mechanisms(
    mechanisms: list[MechanismSpec], victim: Victim, split: DataSplit, batch_sizes: list[int], excluded: int
) -> None:
    """What the mechanisms need from the victim and the data, checked before any run starts."""
    for mech in mechanisms:
        if mech.name == "secagg":
            needed, available = (int(mech.strength) - 1) * max(batch_sizes), len(split.x_train) - excluded
            if needed > available:
                raise utils.UsageError(
                    f"{mech.spec} at batch size {max(batch_sizes)} needs {needed} other clients' images but "
                    f"'{split.name}' has only {available} besides the victim's; use fewer clients or smaller batches."
                )
        if mech.name == "dp-sgd" and mech.strength is None and victim.noise_multiplier is None:
            raise utils.UsageError(
                "mechanism 'dp-sgd' without an ε needs --from-run of a DP-SGD run (it reuses that run's noise); "
                "otherwise give the budget, e.g. dp-sgd:8."
            )
        if mech.name == "dp-sgd" and victim.training["delta"] >= 1 / len(split.x_train):
            raise utils.UsageError(
                f"dp-sgd: δ = {victim.training['delta']} is not below 1/N for the {len(split.x_train)} training "
                f"samples of '{split.name}'; use a larger dataset."
            )


def run_name(victim: Victim, dataset: str, attack: str, mech: MechanismSpec, batch_size: int, seed: int) -> str:
    return f"{victim.name}-{dataset}-{attack}-{mech.spec.replace(':', '')}-b{batch_size}-s{seed}"


def other_clients(
    split: DataSplit, exclude: list[int], clients: int, batch_size: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the other secure-aggregation clients: seeded, from the training set, never the victim's."""
    pool = torch.tensor(sorted(set(range(len(split.x_train))) - set(exclude)))
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    picks = pool[order[: (clients - 1) * batch_size]]
    return [(split.x_train[p], split.y_train[p]) for p in picks.view(clients - 1, batch_size)]


def aux_data(split: DataSplit, exclude: list[int]) -> DataSplit:
    """What a malicious server may learn from: the training split without the victim's images. The test split
    stays with the client, whose poisoning check runs on it."""
    keep = torch.tensor(sorted(set(range(len(split.x_train))) - set(exclude)), dtype=torch.long)
    return dataclasses.replace(
        split,
        x_train=split.x_train[keep],
        y_train=split.y_train[keep],
        x_test=split.x_test[:0],
        y_test=split.y_test[:0],
    )


def attack_run(
    cfg: config.AttackConfig,
    name: str,
    attack_name: str,
    mech: MechanismSpec,
    batch_size: int,
    victim: Victim,
    model: nn.Module,
    split: DataSplit,
    data: PrivateData,
    device: torch.device,
    run_cfg: dict[str, Any],
    detection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Attack every batch of the private images under one mechanism; write the run directory, metrics last.
    `detection`: the client's poisoning check of a malicious server's model, added to the row."""
    attack = ATTACKS[attack_name]
    attack_cfg = dataclasses.replace(cfg, iterations=run_cfg["iterations"])
    run_dir = cfg.out / name
    utils.write_json(run_dir / "config.json", run_cfg)
    start = time.perf_counter()
    trajectory: list[dict[str, Any]] = []
    snapshots: dict[int, list[torch.Tensor]] = {}
    finals, recovered_labels, per_image, losses, failed, failed_restarts = [], [], [], [], 0, 0
    readouts: dict[str, int] = {}  # the analytic attacks' exact readouts and collisions, summed over batches
    setup, epsilon = client_setup(victim, mech, len(split.x_train), cfg.seed)
    for batch in range(len(data.images) // batch_size):
        part = slice(batch * batch_size, (batch + 1) * batch_size)
        originals, labels = data.images[part], data.labels[part]
        setup = dataclasses.replace(setup, seed=cfg.seed + batch)  # fresh noise for every batch
        clients = int(mech.strength) if mech.name == "secagg" else 1
        others = other_clients(split, data.exclude, clients, batch_size, cfg.seed + batch) if clients > 1 else []
        to = lambda t: t.to(device)
        update = client_update(model, to(originals), to(labels), mech, setup, [(to(x), to(y)) for x, y in others])
        observe = make_observer(originals, labels, batch, part.start, trajectory, snapshots)
        rec: Reconstruction = attack.run(model, update, split.input_shape, split.num_classes, attack_cfg, observe)
        scores = reconstruction_scores(originals, rec.images)
        order = torch.as_tensor(scores["order"])
        finals.append(rec.images[order])
        recovered_labels.append(rec.labels[order])
        per_image += [
            {"image": part.start + i, "mse": scores["mse"][i], "psnr": scores["psnr"][i], "ssim": scores["ssim"][i],
             "label_correct": bool(rec.labels[order][i] == labels[i])}
            for i in range(batch_size)
        ]  # fmt: skip
        losses.append(rec.loss)
        failed += rec.failed
        failed_restarts += rec.failed_restarts
        if rec.exact is not None:
            readouts["exact_readouts"] = readouts.get("exact_readouts", 0) + rec.exact
            readouts["collisions"] = readouts.get("collisions", 0) + (rec.collisions or 0)
    final = torch.cat(finals)
    row = summary_row(cfg, run_cfg, per_image, losses, epsilon, time.perf_counter() - start)
    row |= {key: (detection or {}).get(key) for key in DETECTION_COLUMNS}  # empty unless a server poisoned
    write_run(run_dir, data, final, torch.cat(recovered_labels), trajectory, snapshots)
    psnr = np.array([p["psnr"] for p in per_image])
    extra = {"failed_batches": failed, "failed_restarts": failed_restarts, **readouts, "per_image": per_image}
    extra |= {f"recovered_fraction_{db}db": float((psnr >= db).mean()) for db in (20, 30, 40)}
    utils.write_json(run_dir / "metrics.json", {**row, **extra})
    return row


def make_observer(
    originals: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    offset: int,
    trajectory: list[dict[str, Any]],
    snapshots: dict[int, list[torch.Tensor]],
) -> Observer:
    """The evaluation side of `observe`: match the attack's current images to the originals and score them."""

    def observe(iteration: int, images: torch.Tensor, guessed: torch.Tensor, loss: float) -> None:
        scores = reconstruction_scores(originals, images)
        order = torch.as_tensor(scores["order"])
        label_accuracy = float((guessed[order] == labels).float().mean())
        for i in range(len(originals)):
            trajectory.append(
                {"image": offset + i, "batch": batch, "iteration": iteration, "loss": loss, "mse": scores["mse"][i],
                 "psnr": scores["psnr"][i], "ssim": scores["ssim"][i], "label_accuracy": label_accuracy}
            )  # fmt: skip
        snapshots.setdefault(iteration, []).append(images[order])

    return observe


def summary_row(
    cfg: config.AttackConfig,
    run_cfg: dict[str, Any],
    per_image: list[dict[str, Any]],
    losses: list[float],
    epsilon: float | None,
    seconds: float,
) -> dict[str, Any]:
    """success_rate counts images with SSIM >= success_ssim (default 0.5): above it a digit or face is still
    recognisable by eye, while the SSIM of an unrelated noise image stays near 0."""
    column = lambda key: np.array([p[key] for p in per_image], dtype=float)
    mse, psnr, ssim = column("mse"), column("psnr"), column("ssim")
    return {
        "run": run_cfg["run"], "victim": run_cfg["victim"], "dataset": run_cfg["dataset"], "attack": run_cfg["attack"],
        "mechanism": run_cfg["mechanism"], "mechanism_name": run_cfg["mechanism_name"], "strength": run_cfg["strength"],
        "epsilon": epsilon, "batch_size": run_cfg["batch_size"], "num_images": len(per_image),
        "iterations": run_cfg["iterations"], "restarts": cfg.restarts, "loss": float(np.mean(losses)),
        "mse": float(mse.mean()), "psnr": float(psnr.mean()), "ssim": float(ssim.mean()),
        "mse_std": float(mse.std()), "psnr_std": float(psnr.std()), "ssim_std": float(ssim.std()),
        "label_accuracy": float(column("label_correct").mean()),
        "success_rate": float((ssim >= cfg.success_ssim).mean()),
        "recovered_fraction": float((psnr >= RECOVERED_PSNR).mean()), "seconds": seconds, "seed": cfg.seed,
    }  # fmt: skip


def write_run(
    run_dir: Path,
    data: PrivateData,
    final: torch.Tensor,
    recovered: torch.Tensor,
    trajectory: list[dict[str, Any]],
    snapshots: dict[int, list[torch.Tensor]],
) -> None:
    """Everything but metrics.json, each file atomically; snapshots are matched to the originals."""
    utils.write_csv(run_dir / "trajectory.csv", trajectory)
    iterations = sorted(snapshots)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        iterations=np.array(iterations),
        snapshots=torch.stack([torch.cat(snapshots[i]) for i in iterations]).numpy().astype(np.float32),
        originals=data.images.numpy().astype(np.float32),
        labels=data.labels.numpy(),
        recovered_labels=recovered.numpy(),
    )
    utils.atomic_write_bytes(run_dir / "snapshots.npz", buf.getvalue())
    utils.atomic_write_bytes(run_dir / "reconstruction.png", comparison_png(data.images, final))


def comparison_png(originals: torch.Tensor, final: torch.Tensor) -> bytes:
    """Originals (top row) above the final reconstructions (bottom row)."""
    n = len(originals)
    fig = Figure(figsize=(1.4 * n, 3))
    axes = fig.subplots(2, n, squeeze=False)
    for row, images in enumerate((originals, final)):
        for i, image in enumerate(images):
            ax = axes[row][i]
            ax.imshow(as_picture(image), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        axes[row][0].set_title("original" if row == 0 else "reconstruction", fontsize=8, loc="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def as_picture(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) -> HxW or HxWx3 for imshow; a tabular row becomes a one-pixel-high strip."""
    if image.dim() == 1:
        return image[None].numpy()
    return image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()


def default_iterations(attack: str, input_shape: tuple[int, ...]) -> int:
    """The attack's iterations per 1024 input values: a 32x32 colour photo has three times the unknowns of a
    32x32 digit and needs about three times the L-BFGS steps to pass 30 dB."""
    return ATTACKS[attack].default_iterations * math.ceil(math.prod(input_shape) / 1024)


def run_config(
    cfg: config.AttackConfig,
    victim: Victim,
    dataset: str,
    attack: str,
    mech: MechanismSpec,
    batch_size: int,
    name: str,
    data: PrivateData,
) -> dict[str, Any]:
    """config.json: every AttackConfig field that bears on this attack, plus this run's own identity (the
    malicious-server settings bear only on giavmp and rtf, so changing them does not disown a dlg run)."""
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
    if not ATTACKS[attack].prepare:
        fields = {k: v for k, v in fields.items() if k not in MALICIOUS_SERVER_FIELDS}
    fields["images"] = [str(p) for p in cfg.images]
    iterations = cfg.iterations or default_iterations(attack, data.images.shape[1:])
    return {
        **fields, "run": name, "victim": victim.name, "dataset": dataset, "attack": attack, "mechanism": mech.spec,
        "mechanism_name": mech.name, "strength": mech.strength, "batch_size": batch_size, "iterations": iterations,
        "num_images": len(data.images), **data.source,
    }  # fmt: skip


MALICIOUS_SERVER_FIELDS = {"giavmp_per_sample", "rtf_bins", "rtf_measurements", "rtf_measurement", "rtf_thresholds",
                           "honest_epochs", "poisoning_max_drop", "inversion_steps", "inversion_gradient_weight"}  # fmt: skip
# Config fields that do not change a run's numbers (the grid's lists name several runs, not this one).
NOT_RESULT_FIELDS = {"attacks", "mechanisms", "batch_sizes", "log_every", "threads", "device", "data_root", "download",
                     "out", "force", "cache_dir"}  # fmt: skip


def results_table(rows: list[dict[str, Any]]) -> str:
    header = ["attack", "mechanism", "ε", "batch", "PSNR (dB)", "SSIM", "MSE", "label acc.", "success", "seconds"]
    body = [
        [r["attack"], r["mechanism"], _num(r["epsilon"]), r["batch_size"],
         f"{_num(r['psnr']):.1f} ± {_num(r['psnr_std']):.1f}", f"{_num(r['ssim']):.3f} ± {_num(r['ssim_std']):.3f}",
         f"{_num(r['mse']):.2e}", _num(r["label_accuracy"]), _num(r["success_rate"]), _num(r["seconds"])]
        for r in rows
    ]  # fmt: skip
    return utils.markdown_table(header, body)


def _num(value: Any) -> float | None:
    return None if value is None or value == "" else float(value)


def main(args: list[str] | None = None) -> None:
    cfg = config.parse(config.AttackConfig, args)
    torch.set_num_threads(cfg.threads)
    device = utils.pick_device(cfg.device)
    mechanisms = parse_mechanisms(cfg.mechanisms)
    victim, split = load_victim(cfg)
    dataset = "user-images" if cfg.images else victim.dataset
    counts = {b: images_per_run(cfg, b, len(split.x_train)) for b in cfg.batch_sizes}
    data = private_data(cfg, split, max(counts.values()))
    check_mechanisms(mechanisms, victim, split, cfg.batch_sizes, len(data.exclude))
    model = victim.model.to(device)
    if cfg.images and not cfg.labels:
        print(f"note: --images without --labels: every file is labelled class 0 ('{split.classes[0]}').")

    grid = []
    for attack in cfg.attacks:
        for mech in mechanisms:
            for batch_size in cfg.batch_sizes:
                count = counts[batch_size]
                name = run_name(victim, dataset, attack, mech, batch_size, cfg.seed)
                subset = PrivateData(
                    data.images[:count], data.labels[:count], _prefix(data.source, count), data.exclude
                )
                run_cfg = run_config(cfg, victim, dataset, attack, mech, batch_size, name, subset)
                if utils.run_is_done(cfg.out / name) and not cfg.force:
                    utils.check_finished_run(cfg.out / name, run_cfg, NOT_RESULT_FIELDS)
                grid.append((attack, mech, batch_size, name, subset, run_cfg))

    servers, detection = {}, {}  # a malicious server's model per batch size, and the client's check of each
    for attack in cfg.attacks:
        if ATTACKS[attack].prepare:
            aux = aux_data(split, data.exclude)
            served = ATTACKS[attack].prepare(victim.model, split.input_shape, split.num_classes, aux, cfg)
            for batch_size, sent in served.sent.items():
                servers[attack, batch_size] = sent
                detection[attack, batch_size] = check_received_model(served.honest, sent, split, cfg.poisoning_max_drop)
    rows = []
    for attack in cfg.attacks:
        cells = [g for g in grid if g[0] == attack]
        for _, mech, batch_size, name, subset, run_cfg in tqdm(cells, desc=attack, unit="run"):
            if utils.run_is_done(cfg.out / name) and not cfg.force:
                metrics = utils.read_json(cfg.out / name / "metrics.json")
                rows.append({k: metrics.get(k) for k in SUMMARY_COLUMNS})
                continue
            sent = servers.get((attack, batch_size), model).to(device)
            check = detection.get((attack, batch_size))
            row = attack_run(cfg, name, attack, mech, batch_size, victim, sent, split, subset, device, run_cfg, check)
            utils.upsert_summary(cfg.out / "summary.csv", row)
            rows.append(row)
    table = results_table(rows)
    utils.atomic_write_text(cfg.out / "summary.md", table)
    print(table)
    print(f"runs in {cfg.out}/, one row each in {cfg.out / 'summary.csv'}.")


def check_received_model(honest: nn.Module, sent: nn.Module, split: DataSplit, max_drop: float) -> dict[str, Any]:
    """The client's poisoning check on its held-out test split; none without held-out data (photos)."""
    if not len(split.x_test):
        return {}
    return detect_poisoning(honest.cpu(), sent.cpu(), split.x_test, split.y_test, max_drop)


def _prefix(source: dict[str, Any], count: int) -> dict[str, Any]:
    return {k: v[:count] for k, v in source.items()}


if __name__ == "__main__":
    utils.run_cli(main)
