"""Scores: classification metrics through scikit-learn, reconstruction metrics through scikit-image.

Images are compared in [0, 1] (data_range=1 for PSNR and SSIM). A batch of reconstructions is first
matched to the originals by a Hungarian assignment, because gradient attacks recover a batch in no order.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
)

PSNR_CAP = 100.0  # dB reported for a pixel-exact reconstruction (skimage would give inf)


def classification_metrics(y_true, y_pred, num_classes: int) -> dict[str, float]:
    """Accuracy, precision, recall (sensitivity), specificity, F1 and MCC.

    Binary tasks score the positive class (label 1); multi-class tasks use macro averages, with
    specificity the macro average of each class's one-vs-rest true-negative rate.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(num_classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    with np.errstate(divide="ignore", invalid="ignore"):
        specificity_per_class = np.where(tn + fp > 0, tn / (tn + fp), 0.0)
    if num_classes == 2:
        avg = dict(average="binary", pos_label=1)
        specificity = float(specificity_per_class[1])
    else:
        avg = dict(average="macro", labels=labels)
        specificity = float(specificity_per_class.mean())
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision_score(y_true, y_pred, zero_division=0, **avg)),
        "recall": float(recall_score(y_true, y_pred, zero_division=0, **avg)),
        "specificity": specificity,
        "f1": float(f1_score(y_true, y_pred, zero_division=0, **avg)),
        "mcc": float(matthews_corrcoef(y_true, y_pred)),
    }


def _hwc(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [0, 1] to a float64 HxWxC array, clipped to the data range."""
    return image.detach().cpu().double().clamp(0, 1).permute(1, 2, 0).numpy()


def image_scores(original: torch.Tensor, reconstruction: torch.Tensor) -> dict[str, float]:
    """MSE, PSNR (dB, data range 1, capped at PSNR_CAP) and SSIM (data range 1) of one (C, H, W) image."""
    a, b = _hwc(original), _hwc(reconstruction)
    mse = float(mean_squared_error(a, b))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, float(peak_signal_noise_ratio(a, b, data_range=1.0)))
    win = min(7, *(s if s % 2 else s - 1 for s in a.shape[:2]))
    ssim = float(structural_similarity(a, b, data_range=1.0, channel_axis=2, win_size=win))
    return {"mse": mse, "psnr": psnr, "ssim": ssim}


def match_reconstructions(originals: torch.Tensor, reconstructions: torch.Tensor) -> np.ndarray:
    """Hungarian assignment on log pixel MSE (minus the summed PSNR, capped at PSNR_CAP): order[i] is the
    reconstruction matched to original i. On plain MSE the assignment may hand an exact reconstruction to
    another original when that lowers the summed error of blurry ones (a batch of similar faces does so)."""
    a = originals.detach().cpu().flatten(1).double()
    b = reconstructions.detach().cpu().flatten(1).double().clamp(0, 1)
    mse = torch.cdist(a, b).pow(2) / a.shape[1]
    cost = mse.clamp_min(10 ** (-PSNR_CAP / 10)).log10().numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def reconstruction_scores(originals: torch.Tensor, reconstructions: torch.Tensor) -> dict[str, list[float]]:
    """Per-image MSE, PSNR and SSIM after matching, plus the matching order. Tabular rows (not (C, H, W))
    get MSE and PSNR only: SSIM is NaN, as they have no spatial structure."""
    order = match_reconstructions(originals, reconstructions)
    matched = reconstructions[torch.as_tensor(order)]
    scores: dict[str, list[float]] = {"mse": [], "psnr": [], "ssim": [], "order": order.tolist()}
    for orig, rec in zip(originals, matched, strict=True):
        if orig.dim() == 3:
            values = image_scores(orig, rec)
        else:
            mse = float(mean_squared_error(_flat(orig), _flat(rec)))
            psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, float(10 * np.log10(1.0 / mse)))
            values = {"mse": mse, "psnr": psnr, "ssim": float("nan")}
        for key, value in values.items():
            scores[key].append(value)
    return scores


def _flat(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().clamp(0, 1).flatten().numpy()


def count_accuracy(predicted, labels, num_classes: int) -> float:
    """iLRG's count accuracy of a batch's labels, whatever their order: sum_c min(n̂_c, n_c) / B."""
    counts = lambda y: np.bincount(np.asarray(y), minlength=num_classes)  # noqa: E731
    return float(np.minimum(counts(predicted), counts(labels)).sum() / len(labels))
