"""The evaluation side of the leakage study: it alone compares what an attack reports with the private originals.

A RunRecord collects one attack run batch by batch (the states the attack hands to `observe`, matched to the
originals by a Hungarian assignment, its final reconstructions, their PSNR/SSIM/MSE and label accuracy, and for a
readout attack the cosine between the features it read and the true ones) and writes the run directory
(trajectory.csv, snapshots.npz, reconstruction.png, metrics.json last). Nothing under attacks/ imports it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

import utils
from attacks import Observer, Reconstruction
from attacks.readout import layer_inputs
from metrics import reconstruction_scores

if TYPE_CHECKING:
    from config import AttackConfig

RECOVERED_PSNR = 30.0  # dB from which an image counts as recovered (recovered_fraction)
MAX_SHOWN = 32  # reconstruction.png shows at most this many images (the best first, when there are more)


@dataclass
class RunRecord:
    """What the evaluation collects about one attack run, batch by batch: its trajectory and snapshots (the
    attack's observed states, matched to the originals), the final reconstructions and their scores."""

    trajectory: list[dict[str, Any]] = field(default_factory=list)
    snapshots: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    finals: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)  # readout attacks: the features they read
    per_image: list[dict[str, Any]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # failures, and readout attacks' exact readouts
    seconds: float = 0.0

    def observer(self, originals: torch.Tensor, labels: torch.Tensor, batch: int, offset: int) -> Observer:
        """The evaluation side of `observe`: match the attack's current images to the originals and score them."""

        def observe(iteration: int, images: torch.Tensor, guessed: torch.Tensor, loss: float) -> None:
            scores = reconstruction_scores(originals, images)
            order = torch.as_tensor(scores["order"])
            label_accuracy = float((guessed[order] == labels).float().mean())
            for i in range(len(originals)):
                self.trajectory.append(
                    {"image": offset + i, "batch": batch, "iteration": iteration, "loss": loss,
                     "mse": scores["mse"][i], "psnr": scores["psnr"][i], "ssim": scores["ssim"][i],
                     "label_accuracy": label_accuracy}
                )  # fmt: skip
            self.snapshots.setdefault(iteration, []).append(images[order])

        return observe

    def add(self, rec: Reconstruction, originals: torch.Tensor, labels: torch.Tensor, offset: int, model: nn.Module):
        """Score one batch's final reconstruction; for a readout attack also how exactly it read the features
        (cosine to the true features of the matched original, computed here from the private batch)."""
        scores = reconstruction_scores(originals, rec.images)
        order = torch.as_tensor(scores["order"])
        self.finals.append(rec.images[order])
        self.labels.append(rec.labels[order])
        cosines = [math.nan] * len(originals)
        if rec.features is not None:
            self.features.append(rec.features[order])
            true = layer_inputs(model, originals.to(next(model.parameters()).device)).cpu()
            cosines = F.cosine_similarity(rec.features[order].double(), true.double(), dim=1).tolist()
        for i in range(len(originals)):
            self.per_image.append(
                {"image": offset + i, "mse": scores["mse"][i], "psnr": scores["psnr"][i], "ssim": scores["ssim"][i],
                 "label_correct": bool(rec.labels[order][i] == labels[i]), "feature_cosine": cosines[i]}
            )  # fmt: skip
        self.losses.append(rec.loss)
        self.counts["failed_batches"] = self.counts.get("failed_batches", 0) + int(rec.failed)
        self.counts["failed_restarts"] = self.counts.get("failed_restarts", 0) + rec.failed_restarts
        if rec.exact is not None:
            self.counts["exact_readouts"] = self.counts.get("exact_readouts", 0) + rec.exact
            self.counts["collisions"] = self.counts.get("collisions", 0) + (rec.collisions or 0)

    def write(
        self, run_dir: Path, images: torch.Tensor, labels: torch.Tensor, row: dict[str, Any], extra: dict[str, Any]
    ) -> None:
        """Every file of the run, each atomically, metrics.json last (it marks the run finished)."""
        utils.write_csv(run_dir / "trajectory.csv", self.trajectory)
        iterations = sorted(self.snapshots)
        arrays = {
            "iterations": np.array(iterations),
            "snapshots": torch.stack([torch.cat(self.snapshots[i]) for i in iterations]).numpy().astype(np.float32),
            "originals": images.numpy().astype(np.float32),
            "labels": labels.numpy(),
            "recovered_labels": torch.cat(self.labels).numpy(),
        }
        if self.features:
            arrays["features"] = torch.cat(self.features).numpy().astype(np.float32)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        utils.atomic_write_bytes(run_dir / "snapshots.npz", buf.getvalue())
        psnr = np.array([p["psnr"] for p in self.per_image])
        shown = torch.as_tensor(
            np.argsort(-psnr, kind="stable")[:MAX_SHOWN] if len(psnr) > MAX_SHOWN else np.arange(len(psnr))
        )
        utils.atomic_write_bytes(
            run_dir / "reconstruction.png", comparison_png(images[shown], torch.cat(self.finals)[shown])
        )
        shares = {f"recovered_fraction_{db}db": float((psnr >= db).mean()) for db in (20, 30, 40)}
        utils.write_json(
            run_dir / "metrics.json", {**row, **self.counts, **shares, **extra, "per_image": self.per_image}
        )

    def summary_row(self, cfg: AttackConfig, run_cfg: dict[str, Any], privacy: dict[str, Any]) -> dict[str, Any]:
        """success_rate counts images with SSIM >= success_ssim (default 0.5): above it a digit or face is still
        recognisable by eye, while the SSIM of an unrelated noise image stays near 0."""
        column = lambda key: np.array([p[key] for p in self.per_image], dtype=float)
        mse, psnr, ssim, cosine = column("mse"), column("psnr"), column("ssim"), column("feature_cosine")
        return {
            **{k: run_cfg[k] for k in ("run", "victim", "model", "dataset", "attack", "mechanism", "mechanism_name",
                                      "strength", "batch_size", "iterations")},
            **privacy, "num_images": len(self.per_image), "restarts": cfg.restarts,
            "loss": float(np.mean(self.losses)), "mse": float(mse.mean()), "psnr": float(psnr.mean()),
            "ssim": float(ssim.mean()), "mse_std": float(mse.std()), "psnr_std": float(psnr.std()),
            "ssim_std": float(ssim.std()), "label_accuracy": float(column("label_correct").mean()),
            "success_rate": float((ssim >= cfg.success_ssim).mean()),
            "recovered_fraction": float((psnr >= RECOVERED_PSNR).mean()),
            "feature_cosine": None if np.isnan(cosine).all() else float(np.nanmean(cosine)),
            "seconds": self.seconds, "seed": cfg.seed,
        }  # fmt: skip


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


def finished_reconstructions(run_dir: Path, batch_size: int) -> list[Reconstruction]:
    """A finished run's final reconstructions, batch by batch (its snapshots are matched within each batch,
    which leaves every batch's set of images, and so its gradient, as the attack returned it)."""
    metrics = utils.read_json(run_dir / "metrics.json")
    with np.load(run_dir / "snapshots.npz") as npz:
        images, labels = torch.from_numpy(npz["snapshots"][-1]), torch.from_numpy(npz["recovered_labels"])
        features = torch.from_numpy(npz["features"]) if "features" in npz.files else None
    parts = [slice(b, b + batch_size) for b in range(0, len(images), batch_size)]
    return [
        Reconstruction(images[p], labels[p], metrics["loss"], features=None if features is None else features[p])
        for p in parts
    ]


def dmgan_judge(x_held_out: torch.Tensor, y_held_out: torch.Tensor, target: int) -> Callable[[torch.Tensor], tuple]:
    """How close a DMGAN generator's images (N, C, H, W in [0, 1]) come to the class its client lacks, judged on
    a held-out split that neither the model nor the attacker trained on: the mean over the images of the
    nearest real target image's SSIM (skimage, data_range 1) and of the target's probability under a logistic
    regression (scikit-learn) fit on that split. Returns the scoring function (ssim, confidence)."""
    from skimage.metrics import structural_similarity
    from sklearn.linear_model import LogisticRegression

    held_out = LogisticRegression(max_iter=2000).fit(x_held_out.flatten(1).numpy(), y_held_out.numpy())
    column = list(held_out.classes_).index(target)
    real = x_held_out[y_held_out == target].numpy()

    def score(images: torch.Tensor) -> tuple[float, float]:
        ssim = [
            max(structural_similarity(g, r, data_range=1.0, channel_axis=0) for r in real)
            for g in images.detach().cpu().numpy()
        ]
        confidence = held_out.predict_proba(images.detach().cpu().flatten(1).numpy())[:, column]
        return float(np.mean(ssim)), float(np.mean(confidence))

    return score
