"""The analysis step: turns the finished runs under runs/ into print-quality figures and static/report.md.

It reads only what train.py (runs/train) and gradient_attack.py (runs/attack) wrote, so every number in the
report traces back to a run directory. A run directory without metrics.json is unfinished and skipped; one
whose metrics.json is malformed is skipped, and one whose trajectory.csv or snapshots.npz is malformed is left
out of the figures that need that file. Each skip is a warning naming the file, on stderr and at the end of the
report: one bad run never hides the rest, and nothing is dropped silently.

    uv run analysis.py
    uv run analysis.py --runs runs --out static --ssim-threshold 0.5 --dpi 200
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

import config
from config import AnalysisConfig
from utils import UsageError, atomic_write_bytes, atomic_write_text, markdown_table, read_json, run_cli

TRAIN_KEYS = ["run", "dataset", "model", "privacy", "target_epsilon", "epsilon", "accuracy", "precision", "recall"]
TRAIN_KEYS += ["specificity", "f1", "mcc", "seed"]
ATTACK_KEYS = ["run", "victim", "dataset", "attack", "mechanism", "mechanism_name", "strength", "epsilon"]
ATTACK_KEYS += ["batch_size", "num_images", "loss", "mse", "psnr", "ssim", "label_accuracy", "success_rate", "seed"]
IMAGE_KEYS = ["image", "mse", "psnr", "ssim", "label_correct"]
TRAJECTORY_COLUMNS = ["image", "iteration", "loss", "ssim"]
SNAPSHOT_KEYS = ["iterations", "snapshots", "originals"]
SCENARIO = ["victim", "dataset", "attack"]  # one attack on one model and dataset: figures compare within it

PRIVACY_ORDER = ["none", "dp-sgd", "regularized"]
PRIVACY_LABELS = {"none": "Plain training", "dp-sgd": "DP-SGD", "regularized": "Loss regularization"}
MECHANISM_ORDER = ["none", "dp-sgd", "regularized", "noise", "prune", "quantize", "topk", "secagg"]
# Which way "stronger" runs for each defense's strength: +1 = a larger value protects more (more noise, more
# pruning, more clients summed), -1 = a smaller one does (a smaller ε, fewer bits, fewer coordinates kept).
STRONGER = {"noise": 1, "prune": 1, "secagg": 1, "regularized": 1, "dp-sgd": -1, "quantize": -1, "topk": -1}
STRENGTH_LABELS = {
    "noise": "noise σ",
    "dp-sgd": "target ε",
    "prune": "pruned fraction",
    "quantize": "bits per value",
    "topk": "kept fraction (top-k)",
    "secagg": "updates aggregated",
    "regularized": "regularization σ",
}
LOG_STRENGTH = {"noise", "dp-sgd"}  # strengths that span decades


@dataclass
class Study:
    """Everything the figures and tables need, read once from runs/."""

    train: pd.DataFrame  # one row per finished training run (its metrics.json)
    attack: pd.DataFrame  # one row per finished attack run (its metrics.json), plus its directory and files
    images: pd.DataFrame  # one row per attacked image of every attack run (metrics.json's per_image)
    trajectories: pd.DataFrame  # every readable trajectory.csv, with the run's name
    problems: list[str] = field(default_factory=list)  # skipped runs and files, for stderr and the report


# ---------------------------------------------------------------------------------------------- reading runs/


def _run_dirs(study_dir: Path) -> list[Path]:
    return (
        sorted(d for d in study_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        if study_dir.is_dir()
        else []
    )


def _read_metrics(run_dir: Path, keys: list[str], problems: list[str]) -> dict | None:
    """A finished run's metrics.json, or None (with the reason in problems) when it is absent or malformed."""
    path = run_dir / "metrics.json"
    if not path.exists():
        problems.append(f"{run_dir}: no metrics.json (unfinished or interrupted); re-run the study to finish it.")
        return None
    try:
        metrics = read_json(path)
    except (OSError, ValueError) as err:
        problems.append(f"{path} is not readable JSON ({err}); the run is skipped.")
        return None
    missing = [k for k in keys if k not in metrics] if isinstance(metrics, dict) else keys
    if missing:
        problems.append(f"{path} lacks {', '.join(missing)}; the run is skipped.")
        return None
    return metrics


def _read_attack_run(run_dir: Path, problems: list[str]) -> dict | None:
    """An attack run's metrics plus which of its per-iteration files are usable."""
    metrics = _read_metrics(run_dir, [*ATTACK_KEYS, "per_image"], problems)
    if metrics is None:
        return None
    per_image = metrics["per_image"]
    if not isinstance(per_image, list) or not all(isinstance(r, dict) and set(IMAGE_KEYS) <= set(r) for r in per_image):
        problems.append(f"{run_dir / 'metrics.json'}: per_image must list {{{', '.join(IMAGE_KEYS)}}}; skipped.")
        return None
    snapshots = run_dir / "snapshots.npz"
    try:
        with np.load(snapshots) as npz:
            lacking = [k for k in SNAPSHOT_KEYS if k not in npz.files]
        trouble = f"lacks {', '.join(lacking)}" if lacking else ""
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        trouble = f"is unreadable ({err})"
    if trouble:
        problems.append(f"{snapshots} {trouble}; the reconstruction figures leave this run out.")
    return metrics | {"dir": run_dir, "has_snapshots": not trouble}


def _read_trajectory(run: str, run_dir: Path, problems: list[str]) -> pd.DataFrame | None:
    path = run_dir / "trajectory.csv"
    try:
        frame = pd.read_csv(path)
        missing = [c for c in TRAJECTORY_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        frame = frame.astype({c: float for c in TRAJECTORY_COLUMNS})
    except (OSError, ValueError) as err:  # pandas' parse errors are ValueErrors
        problems.append(f"{path} is unusable ({err}); the evolution figures leave this run out.")
        return None
    return frame.assign(run=run)


def load_study(runs: Path) -> Study:
    """Read every finished run under runs/train and runs/attack; UsageError when there is none at all."""
    problems: list[str] = []
    train = [m for d in _run_dirs(runs / "train") if (m := _read_metrics(d, TRAIN_KEYS, problems))]
    attack = [m for d in _run_dirs(runs / "attack") if (m := _read_attack_run(d, problems))]
    if not train and not attack:
        skipped = f" Skipped: {' '.join(problems)}" if problems else ""
        raise UsageError(
            f"no finished runs under '{runs}' (looked for {runs}/train/*/metrics.json and "
            f"{runs}/attack/*/metrics.json). Run the studies first: `uv run train.py` (classification benchmark), "
            f"then `uv run gradient_attack.py` (leakage study); or point --runs at the folder that holds their "
            f"train/ and attack/ folders.{skipped}"
        )
    images = [{"run": m["run"], **{k: r[k] for k in IMAGE_KEYS}} for m in attack for r in m["per_image"]]
    trajectories = [t for m in attack if (t := _read_trajectory(m["run"], m["dir"], problems)) is not None]
    numeric = ["target_epsilon", "epsilon", "strength", "batch_size", "num_images", "mse", "psnr", "ssim"]
    train_frame = pd.DataFrame(train, columns=TRAIN_KEYS)
    attack_frame = pd.DataFrame(attack, columns=[*ATTACK_KEYS, "dir", "has_snapshots"])
    for frame in (train_frame, attack_frame):
        cols = [c for c in numeric if c in frame.columns]
        frame[cols] = frame[cols].apply(pd.to_numeric, errors="coerce")
    return Study(
        train=train_frame,
        attack=attack_frame,
        images=pd.DataFrame(images, columns=["run", *IMAGE_KEYS]).astype({k: float for k in IMAGE_KEYS}),
        trajectories=pd.concat(trajectories) if trajectories else pd.DataFrame(columns=["run", *TRAJECTORY_COLUMNS]),
        problems=problems,
    )


# ---------------------------------------------------------------------------------------------- shared helpers


def _smallest_batch(attack: pd.DataFrame) -> pd.DataFrame:
    """Each scenario's runs at its smallest batch size: curves across mechanisms compare like with like (batch
    size has a figure of its own)."""
    return attack[attack.batch_size == attack.groupby(SCENARIO).batch_size.transform("min")]


def _mechanisms(frame: pd.DataFrame) -> list[str]:
    """Mechanism specs in reading order: no defense first, then each defense from its weakest to strongest."""
    rank = {name: i for i, name in enumerate(MECHANISM_ORDER)}

    def key(row) -> tuple:
        strength = row.strength if pd.notna(row.strength) else -np.inf
        return (
            rank.get(row.mechanism_name, len(rank)),
            row.mechanism_name,
            STRONGER.get(row.mechanism_name, 1) * strength,
        )

    return [row.mechanism for row in sorted(frame.drop_duplicates("mechanism").itertuples(), key=key)]


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _title(scenario: tuple) -> str:
    victim, dataset, attack = scenario
    return f"{attack} on {victim} ({dataset})"


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def _save(fig: plt.Figure, path: Path, dpi: int) -> str:
    """Render to memory, then write atomically: an interrupted analysis never leaves half a PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return f"![{path.stem.replace('_', ' ')}]({path.name})\n"


def _show(ax: plt.Axes, x: np.ndarray) -> None:
    """One sample as a picture: (C, H, W) colour or grey, (H, W) grey, a tabular row as a one-pixel-high strip."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
    elif x.ndim == 1:
        x = x[None, :]
    aspect = "auto" if x.shape[0] == 1 else "equal"
    ax.imshow(x, cmap="gray" if x.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_axis(ax: plt.Axes, values, base: int = 10) -> None:
    """Log x with ticks at the values that were run, written plainly (8, 25, 50 rather than 10^1)."""
    ax.set_xscale("log", base=base)
    ax.set_xticks(sorted(set(values)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _mean_std(values: pd.Series | np.ndarray, digits: int = 3) -> str:
    """'mean ± std' (population std over images or seeds) where there are several values, else the value."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return "--"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


# ---------------------------------------------------------------------------------------------- figures


def plot_evolution(study: Study, cfg: AnalysisConfig, column: str, ylabel: str, name: str, leaking_only=False) -> str:
    """A per-iteration score, one line per mechanism (median over images, interquartile band), one panel per
    scenario. leaking_only keeps the mechanisms whose final median SSIM stays at or above the threshold."""
    runs = _smallest_batch(study.attack)
    traj = study.trajectories.merge(runs[["run", *SCENARIO, "mechanism", "mechanism_name", "strength"]], on="run")
    if traj.empty:
        return "_Skipped: no attack run has a readable trajectory.csv._\n"
    colors = _colors(_mechanisms(runs))
    panels = []
    for scenario, group in traj.groupby(SCENARIO):
        curves = {}
        for mech in _mechanisms(group):
            rows = group[group.mechanism == mech]
            curves[mech] = rows.groupby("iteration")[column].quantile([0.25, 0.5, 0.75]).unstack()
            final_ssim = rows[rows.iteration == rows.iteration.max()].ssim.median()
            if leaking_only and not final_ssim >= cfg.ssim_threshold:
                del curves[mech]
        if curves:
            panels.append((scenario, curves))
    if not panels:
        return (
            f"_Skipped: no mechanism keeps a final median SSIM ≥ {cfg.ssim_threshold}; every one stops the attack._\n"
        )
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (scenario, curves) in zip(axes[0], panels, strict=True):
        for mech, q in curves.items():
            ax.plot(q.index, q[0.5], color=colors[mech], label=mech, marker="o" if len(q) == 1 else None)
            ax.fill_between(q.index, q[0.25], q[0.75], color=colors[mech], alpha=0.2, linewidth=0)
        if column == "ssim":
            ax.axhline(cfg.ssim_threshold, color="grey", ls="--", lw=1, label=f"threshold {cfg.ssim_threshold}")
        if column == "loss":
            ax.set_yscale("log")
        ax.set(title=_title(scenario), xlabel="attack iteration", ylabel=ylabel)
        ax.legend(fontsize=8)
    return _save(fig, cfg.out / f"{name}.png", cfg.dpi)


def _representatives(study: Study) -> pd.DataFrame:
    """One run per (scenario, mechanism) to show as pictures: the smallest batch, lowest seed, with snapshots."""
    runs = _smallest_batch(study.attack)
    return runs[runs.has_snapshots.astype(bool)].sort_values("seed").drop_duplicates([*SCENARIO, "mechanism"])


def plot_reconstruction_grids(study: Study, cfg: AnalysisConfig) -> str:
    """Per scenario: one row per image, its original first, then each mechanism's final reconstruction."""
    reps = _representatives(study)
    if reps.empty:
        return "_Skipped: no attack run has a readable snapshots.npz._\n"
    markdown = ""
    for scenario, group in reps.groupby(SCENARIO):
        mechs = _mechanisms(group)
        finals, originals = [], None
        for mech in mechs:
            run = group[group.mechanism == mech].iloc[0]
            with np.load(run.dir / "snapshots.npz") as npz:
                finals.append((f"{mech}\nSSIM {run.ssim:.2f}", npz["snapshots"][-1]))
                originals = npz["originals"] if originals is None else originals
        n = min(cfg.max_images, len(originals), *(len(f) for _, f in finals))
        columns = [("original", originals), *finals]
        fig, axes = plt.subplots(n, len(columns), figsize=(1.3 * len(columns), 1.3 * n + 0.8), squeeze=False)
        for i, row in enumerate(axes):
            for ax, (_, images) in zip(row, columns, strict=True):
                _show(ax, images[i])
            row[0].set_ylabel(f"image {i}", fontsize=8)
        for ax, (label, _) in zip(axes[0], columns, strict=True):
            ax.set_title(label, fontsize=7)
        fig.suptitle(f"Originals vs final reconstructions: {_title(scenario)}")
        markdown += _save(fig, cfg.out / f"reconstructions_{_slug(*scenario)}.png", cfg.dpi)
    return markdown


def plot_reconstruction_evolution(study: Study, cfg: AnalysisConfig) -> str:
    """Per scenario and mechanism: each image's original, then its reconstruction at evenly spread snapshots."""
    reps = _representatives(study)
    if reps.empty:
        return "_Skipped: no attack run has a readable snapshots.npz._\n"
    markdown = ""
    for scenario, group in reps.groupby(SCENARIO):
        for mech in _mechanisms(group):
            run = group[group.mechanism == mech].iloc[0]
            with np.load(run.dir / "snapshots.npz") as npz:
                iterations, snapshots, originals = npz["iterations"], npz["snapshots"], npz["originals"]
            picks = np.unique(np.linspace(0, len(iterations) - 1, min(cfg.max_snapshots, len(iterations))).round())
            picks = picks.astype(int)
            n = min(cfg.max_images, len(originals), snapshots.shape[1])
            fig, axes = plt.subplots(n, 1 + len(picks), figsize=(1.5 * (1 + len(picks)), 1.5 * n + 0.6), squeeze=False)
            for i, row in enumerate(axes):
                _show(row[0], originals[i])
                for ax, s in zip(row[1:], picks, strict=True):
                    _show(ax, snapshots[s, i])
                row[0].set_ylabel(f"image {i}", fontsize=8)
            axes[0, 0].set_title("original", fontsize=8)
            for ax, s in zip(axes[0, 1:], picks, strict=True):
                ax.set_title(f"iteration {iterations[s]}", fontsize=8)
            fig.suptitle(f"Reconstruction over iterations: {mech}, {_title(scenario)}")
            markdown += _save(fig, cfg.out / f"evolution_{_slug(*scenario, mech)}.png", cfg.dpi)
    return markdown


def _privacy_panel(ax: plt.Axes, frame: pd.DataFrame, mode: str, target: str, value: str, by: list[str]) -> None:
    """value against ε for DP runs (mean ± std over seeds at each target ε, placed at the ε spent), with plain
    (ε = ∞) and regularized (no ε) training as horizontal reference lines in the same colour."""
    if frame.empty:
        ax.text(0.5, 0.5, "no runs", transform=ax.transAxes, ha="center", va="center", color="grey")
        return
    epsilons = []
    for i, (key, group) in enumerate(frame.groupby(by)):
        color, name = f"C{i}", " / ".join(str(k) for k in key)
        dp = group[group[mode] == "dp-sgd"]
        if not dp.empty:
            at = dp.assign(eps=dp.epsilon.fillna(dp[target])).groupby(target)
            mean, std = at[value].mean(), at[value].std(ddof=0)
            ax.errorbar(at.eps.mean(), mean, yerr=std, color=color, marker="o", capsize=3, label=f"{name}: DP-SGD")
            epsilons += list(at.eps.mean().round(1))
        for mode_name, style, label in (("none", "--", "plain (ε = ∞)"), ("regularized", ":", "regularized (no ε)")):
            reference = group[group[mode] == mode_name][value]
            if not reference.empty:
                ax.axhline(reference.mean(), color=color, ls=style, label=f"{name}: {label}")
    if epsilons:
        _log_axis(ax, epsilons)
    ax.set_xlabel("ε spent (log scale; plain training has ε = ∞)")
    ax.legend(fontsize=7)


def plot_tradeoff(study: Study, cfg: AnalysisConfig) -> str:
    """The study's question in one picture: per model, what each privacy setting costs in test accuracy (left)
    and what it buys against the attack (final SSIM and PSNR at the same ε, right)."""
    attack = _smallest_batch(study.attack)
    attack = attack[attack.mechanism_name.isin(PRIVACY_ORDER)]
    models = sorted(set(study.train.model) | set(attack.victim))
    if not models:
        return "_Skipped: no training runs and no attack runs with mechanism none, dp-sgd or regularized._\n"
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.2 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        _privacy_panel(
            row[0], study.train[study.train.model == model], "privacy", "target_epsilon", "accuracy", ["dataset"]
        )
        row[0].set(ylabel="test accuracy", title=f"{model}: utility")
        for ax, metric, ylabel in zip(
            row[1:], ["ssim", "psnr"], ["final SSIM (1 = exact copy)", "final PSNR (dB)"], strict=True
        ):
            runs = attack[attack.victim == model]
            _privacy_panel(ax, runs, "mechanism_name", "strength", metric, ["attack", "dataset"])
            ax.set(ylabel=ylabel, title=f"{model}: leakage ({metric.upper()})")
        row[1].axhline(cfg.ssim_threshold, color="grey", lw=1, label=f"threshold {cfg.ssim_threshold}")
        row[1].legend(fontsize=7)
    return _save(fig, cfg.out / "privacy_tradeoff.png", cfg.dpi)


def sweep_table(study: Study) -> pd.DataFrame:
    """Final SSIM and PSNR (mean and std over images, pooled across seeds) per scenario, defense and strength,
    for the defenses run at two or more strengths."""
    runs = _smallest_batch(study.attack)
    runs = runs[runs.strength.notna() & (runs.mechanism_name != "none")]
    runs = runs[runs.groupby([*SCENARIO, "mechanism_name"]).strength.transform("nunique") >= 2]
    pooled = study.images.merge(runs[["run", *SCENARIO, "mechanism_name", "strength"]], on="run")
    population_std = lambda s: s.std(ddof=0)
    stats = pooled.groupby([*SCENARIO, "mechanism_name", "strength"]).agg(
        ssim=("ssim", "mean"),
        ssim_std=("ssim", population_std),
        psnr=("psnr", "mean"),
        psnr_std=("psnr", population_std),
    )
    return stats.reset_index()


def breaking_point(strengths: np.ndarray, ssim: np.ndarray, stronger: int, threshold: float) -> float | None:
    """The weakest strength from which on every stronger one keeps the final SSIM below the threshold (a single
    dip below the line on a noisy curve is not a break); None when the strongest one tested still leaks."""
    order = np.argsort(stronger * np.asarray(strengths, dtype=float))  # weakest first
    point = None
    for i in order[::-1]:
        if not ssim[i] < threshold:
            break
        point = float(strengths[i])
    return point


def breaking_points(sweeps: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """One row per swept (scenario, defense): its strengths weakest first, their SSIMs and the breaking point."""
    rows = []
    for (*scenario, name), group in sweeps.groupby([*SCENARIO, "mechanism_name"]):
        stronger = STRONGER.get(name)
        group = group.sort_values("strength", ascending=stronger != -1)
        point = breaking_point(group.strength.values, group.ssim.values, stronger, threshold) if stronger else None
        ssim_at = group.ssim[group.strength == point].iloc[0] if point is not None else np.nan
        rows.append(
            dict(
                zip(SCENARIO, scenario, strict=True),
                mechanism_name=name,
                stronger=stronger,
                point=point,
                ssim_at=ssim_at,
            )
            | {"strengths": group.strength.tolist(), "ssims": group.ssim.tolist()}
        )
    return pd.DataFrame(
        rows, columns=[*SCENARIO, "mechanism_name", "stronger", "point", "ssim_at", "strengths", "ssims"]
    )


def plot_sensitivity(sweeps: pd.DataFrame, breaks: pd.DataFrame, cfg: AnalysisConfig) -> str:
    """Final SSIM (top) and PSNR (bottom) against each swept defense's strength, breaking points starred."""
    if sweeps.empty:
        return (
            "_Skipped: no defense was run at several strengths; sweep them with e.g. "
            "`uv run gradient_attack.py --mechanisms noise:1e-4,1e-3,1e-2,1e-1 prune:0.3,0.6,0.9`._\n"
        )
    names = [n for n in MECHANISM_ORDER if n in set(sweeps.mechanism_name)]
    names += sorted(set(sweeps.mechanism_name) - set(names))
    points = {
        (*key[:3], key[3]): key[4] for key in breaks[[*SCENARIO, "mechanism_name", "point"]].itertuples(index=False)
    }
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False)
    for col, name in zip(axes.T, names, strict=True):
        for i, (scenario, group) in enumerate(sweeps[sweeps.mechanism_name == name].groupby(SCENARIO)):
            group = group.sort_values("strength")
            for ax, metric in zip(col, ["ssim", "psnr"], strict=True):
                yerr = group[f"{metric}_std"]
                ax.errorbar(
                    group.strength,
                    group[metric],
                    yerr=yerr,
                    color=f"C{i}",
                    marker="o",
                    capsize=3,
                    label=_title(scenario),
                )
            point = points[(*scenario, name)]
            if pd.notna(point):
                at = group[group.strength == point]
                for ax, metric in zip(col, ["ssim", "psnr"], strict=True):
                    ax.plot(
                        point, at[metric].iloc[0], "*", color="red", ms=16, zorder=5, label=f"breaking point {point:g}"
                    )
                    ax.axvline(point, color="red", ls=":", lw=1)
        direction = {1: "larger is stronger", -1: "smaller is stronger"}.get(STRONGER.get(name), "direction unknown")
        col[0].axhline(cfg.ssim_threshold, color="grey", ls="--", lw=1, label=f"threshold {cfg.ssim_threshold}")
        col[0].set(title=f"defense: {name}", ylabel="final SSIM (mean ± std over images)")
        col[1].set(ylabel="final PSNR (dB, mean ± std over images)")
        for ax in col:
            if name in LOG_STRENGTH:
                _log_axis(ax, sweeps[sweeps.mechanism_name == name].strength)
            ax.set_xlabel(
                f"{STRENGTH_LABELS.get(name, 'strength')} ({direction}{', log scale' * (name in LOG_STRENGTH)})"
            )
            ax.legend(fontsize=7)
    return _save(fig, cfg.out / "defense_sensitivity.png", cfg.dpi)


def plot_batch_size(study: Study, cfg: AnalysisConfig) -> str:
    """Attack success rate and mean final PSNR against the batch size the victim's update was computed on."""
    runs = study.attack[study.attack.groupby([*SCENARIO, "mechanism"]).batch_size.transform("nunique") >= 2]
    if runs.empty:
        return "_Skipped: every attack ran at a single batch size; sweep it with `uv run gradient_attack.py --batch-sizes 1 2 4 8`._\n"
    fig, (ax_success, ax_psnr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (key, group) in enumerate(runs.groupby([*SCENARIO, "mechanism"])):
        label = f"{_title(key[:3])}, {key[3]}"
        success = group.groupby("batch_size").success_rate.mean()
        psnr = study.images.merge(group[["run", "batch_size"]], on="run").groupby("batch_size").psnr
        ax_success.plot(success.index, success.values, color=f"C{i}", marker="o", label=label)
        ax_psnr.errorbar(
            psnr.mean().index, psnr.mean(), yerr=psnr.std(ddof=0), color=f"C{i}", marker="o", capsize=3, label=label
        )
    ax_success.set(ylabel="success rate (fraction of images)", ylim=(-0.05, 1.05), title="attack success")
    ax_psnr.set(ylabel="final PSNR (dB, mean ± std over images)", title="reconstruction quality")
    for ax in (ax_success, ax_psnr):
        _log_axis(ax, runs.batch_size, base=2)
        ax.set_xlabel("batch size (images per shared update, log scale)")
        ax.legend(fontsize=7)
    return _save(fig, cfg.out / "batch_size.png", cfg.dpi)


# ---------------------------------------------------------------------------------------------- tables


def classification_table(study: Study) -> str:
    """Models x privacy modes, grouped by model as in the seed study; mean ± std where several seeds ran."""
    header = ["Model / training", "ε target", "ε spent", "Accuracy", "Precision", "Recall", "Specificity", "F1", "MCC"]
    header += ["Seeds"]
    rows = []
    for (dataset, model), group in study.train.groupby(["dataset", "model"]):
        rows.append([f"**{model}** ({dataset})"] + [" "] * (len(header) - 1))
        rank = group.privacy.map({p: i for i, p in enumerate(PRIVACY_ORDER)}).fillna(len(PRIVACY_ORDER))
        for (_, privacy, target), runs in group.assign(rank=rank).groupby(
            ["rank", "privacy", "target_epsilon"], dropna=False
        ):
            label = f"DP-SGD (ε = {target:g})" if privacy == "dp-sgd" else PRIVACY_LABELS.get(privacy, privacy)
            target_cell = {"none": "∞", "dp-sgd": f"{target:g}"}.get(privacy, "--")
            metrics = [_mean_std(runs[m]) for m in ["accuracy", "precision", "recall", "specificity", "f1", "mcc"]]
            rows.append([label, target_cell, _mean_std(runs.epsilon, 2), *metrics, len(runs)])
    return markdown_table(header, rows)


def attack_table(study: Study) -> str:
    """Mechanism x attack: PSNR, SSIM, MSE as mean ± std over images (pooled across seeds); label accuracy and
    success rate as mean ± std over runs."""
    header = ["Victim", "Dataset", "Attack", "Mechanism", "ε spent", "Batch", "Images", "PSNR (dB)", "SSIM", "MSE"]
    header += ["Label acc.", "Success rate"]
    rows = []
    for scenario, group in study.attack.groupby(SCENARIO):
        for mech in _mechanisms(group):
            for batch, runs in group[group.mechanism == mech].groupby("batch_size"):
                images = study.images[study.images.run.isin(runs.run)]
                scores = [_mean_std(images.psnr, 2), _mean_std(images.ssim), _mean_std(images.mse, 4)]
                rates = [_mean_std(runs.label_accuracy), _mean_std(runs.success_rate)]
                rows.append([*scenario, mech, _mean_std(runs.epsilon, 2), int(batch), len(images), *scores, *rates])
    return markdown_table(header, rows)


def breaking_table(breaks: pd.DataFrame, threshold: float) -> str:
    """Where each swept defense stops the attack (final mean SSIM below the threshold from there on)."""
    if breaks.empty:
        return ""
    header = ["Victim", "Dataset", "Attack", "Defense", "Stronger when", "SSIM at each strength (weak → strong)"]
    header += [f"Breaking point (SSIM < {threshold})", "SSIM there"]
    rows = []
    for row in breaks.itertuples():
        direction = {1: "larger", -1: "smaller"}.get(row.stronger, "unknown")
        curve = ", ".join(f"{s:g}: {v:.2f}" for s, v in zip(row.strengths, row.ssims, strict=True))
        point = "not reached" if direction != "unknown" else "unknown direction"
        point = f"{row.point:g}" if pd.notna(row.point) else point
        rows.append([row.victim, row.dataset, row.attack, row.mechanism_name, direction, curve, point, row.ssim_at])
    return "\n" + markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------- the report


def build_report(study: Study, cfg: AnalysisConfig) -> str:
    """Write every figure whose inputs exist and return report.md's text, sections in reading order."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    no_train = f"_No finished training runs under {cfg.runs}/train: run `uv run train.py` to make them._\n"
    no_attack = f"_No finished attack runs under {cfg.runs}/attack: run `uv run gradient_attack.py` to make them._\n"
    has_attack = not study.attack.empty
    sweeps = sweep_table(study)
    breaks = breaking_points(sweeps, cfg.ssim_threshold)
    ssim_label = "SSIM (1 = exact copy)"
    sections = {
        "Classification benchmark": classification_table(study) if not study.train.empty else no_train,
        "Privacy–utility–leakage trade-off": plot_tradeoff(study, cfg),
        "Attack results": attack_table(study) if has_attack else no_attack,
        "SSIM evolution": plot_evolution(study, cfg, "ssim", ssim_label, "ssim_evolution") if has_attack else no_attack,
        f"SSIM evolution, mechanisms that still leak (final median SSIM ≥ {cfg.ssim_threshold})": (
            plot_evolution(study, cfg, "ssim", ssim_label, "ssim_evolution_filtered", leaking_only=True)
            if has_attack
            else no_attack
        ),
        "Loss evolution": (
            plot_evolution(study, cfg, "loss", "gradient-matching loss (log scale)", "loss_evolution")
            if has_attack
            else no_attack
        ),
        "Originals vs final reconstructions": plot_reconstruction_grids(study, cfg) if has_attack else no_attack,
        "Reconstruction evolution": plot_reconstruction_evolution(study, cfg) if has_attack else no_attack,
        "Defense sensitivity": plot_sensitivity(sweeps, breaks, cfg) + breaking_table(breaks, cfg.ssim_threshold),
        "Batch-size impact": plot_batch_size(study, cfg) if has_attack else no_attack,
    }
    if study.problems:
        sections["Skipped runs and files"] = "".join(f"- {p}\n" for p in study.problems)
    intro = (
        f"Made by `uv run analysis.py` from {len(study.train)} training and {len(study.attack)} attack runs under "
        f"`{cfg.runs}`. An attack counts as stopped where the final SSIM falls below {cfg.ssim_threshold}. "
        "Scores are mean ± std over images (attacks) or seeds (training) where there are several; curves over "
        "mechanisms use each scenario's smallest batch size.\n"
    )
    return "# Gradient leakage: report\n\n" + intro + "".join(f"\n## {t}\n\n{body}" for t, body in sections.items())


def main(args: list[str] | None = None) -> None:
    cfg = config.parse(AnalysisConfig, args)
    study = load_study(cfg.runs)
    for problem in study.problems:
        print(f"warning: {problem}", file=sys.stderr)
    report = build_report(study, cfg)
    atomic_write_text(cfg.out / "report.md", report)
    print(
        f"wrote {cfg.out / 'report.md'} and its figures ({len(study.train)} training, {len(study.attack)} attack runs)"
    )


if __name__ == "__main__":
    run_cli(main)
