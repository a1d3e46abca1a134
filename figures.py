"""The figures of the report, one function per figure, each plotted top to bottom. Every function writes its
PNG(s) atomically into cfg.out and returns the Markdown that embeds them, or a one-line note saying why the
figure was skipped (its inputs are absent), so a partial study still gets a report."""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

from config import AnalysisConfig
from results import (
    MECHANISM_ORDER,
    PRIVACY_ORDER,
    SCENARIO,
    STRONGER,
    Study,
    mechanism_order,
    scenario_title,
    smallest_batch,
    strongest,
)
from utils import atomic_write_bytes

STRENGTH_LABELS = {
    "noise": "noise σ",
    "dp-sgd": "target ε",
    "prune": "pruned fraction",
    "quantize": "bits per value",
    "topk": "kept fraction (top-k)",
    "secagg": "clients aggregated (secure aggregation)",
}
LOG_STRENGTH = {"noise", "dp-sgd"}  # strengths that span decades


def _colors(names: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


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


def plot_evolution(study: Study, cfg: AnalysisConfig, column: str, ylabel: str, name: str, leaking_only=False) -> str:
    """A per-iteration score, one line per mechanism (median over images, interquartile band), one panel per
    scenario. leaking_only keeps the mechanisms whose final median SSIM stays at or above the threshold."""
    runs = smallest_batch(study.attack)
    traj = study.trajectories.merge(runs[["run", *SCENARIO, "mechanism", "mechanism_name", "strength"]], on="run")
    if traj.empty:
        return "_Skipped: no attack run has a readable trajectory.csv._\n"
    if traj[column].isna().all() or traj.ssim.isna().all():
        return f"_Skipped: no run logged {column} and SSIM (tabular data has no SSIM: no spatial structure)._\n"
    colors = _colors(mechanism_order(study.attack))  # one colour per mechanism in every figure
    panels = []
    for scenario, group in traj.groupby(SCENARIO):
        curves = {}
        for mech in mechanism_order(group):
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
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False, layout="constrained")
    for ax, (scenario, curves) in zip(axes[0], panels, strict=True):
        for mech, q in curves.items():
            ax.plot(q.index, q[0.5], color=colors[mech], label=mech, marker="o" if len(q) == 1 else None)
            ax.fill_between(q.index, q[0.25], q[0.75], color=colors[mech], alpha=0.2, linewidth=0)
        if column == "ssim":
            ax.axhline(cfg.ssim_threshold, color="grey", ls="--", lw=1, label=f"threshold {cfg.ssim_threshold}")
        if column == "loss":
            ax.set_yscale("log")
        ax.set(title=scenario_title(scenario), xlabel="attack iteration", ylabel=ylabel)
        ax.legend(fontsize=8)
    return _save(fig, cfg.out / f"{name}.png", cfg.dpi)


NO_SNAPSHOTS = "_Skipped: no attack run has a readable snapshots.npz._\n"


def _picture_scenarios(runs: pd.DataFrame, by: list[str] = SCENARIO) -> list[tuple[tuple, pd.DataFrame]]:
    """Per group, one run per mechanism to show as pictures: the smallest batch, lowest seed, with snapshots."""
    runs = smallest_batch(runs)
    reps = runs[runs.has_snapshots.astype(bool)].sort_values("seed").drop_duplicates([*by, "mechanism"])
    return list(reps.groupby(by))


def _image_grid(columns: list[tuple[str, np.ndarray]], n: int, title: str) -> plt.Figure:
    """One row per image (the first n), one titled column per (title, images) pair."""
    fig, axes = plt.subplots(
        n, len(columns), figsize=(1.4 * len(columns), 1.4 * n + 0.7), squeeze=False, layout="constrained"
    )
    for i, row in enumerate(axes):
        for ax, (_, images) in zip(row, columns, strict=True):
            _show(ax, images[i])
        row[0].set_ylabel(f"image {i}", fontsize=8)
    for ax, (label, _) in zip(axes[0], columns, strict=True):
        ax.set_title(label, fontsize=7)
    fig.suptitle(title)
    return fig


def plot_reconstruction_grids(study: Study, cfg: AnalysisConfig, privacy: bool = False) -> str:
    """Per scenario: one row per image, its original first, then each mechanism's final reconstruction.
    `privacy`: per model instead, the strongest attack (auto, where it ran) against each privacy mode its
    training runs share (plain, DP-SGD at each ε, regularized), side by side on the same images."""
    if privacy:
        runs = strongest(study.attack[study.attack.mechanism_name.isin(PRIVACY_ORDER)])
        scenarios = _picture_scenarios(runs, ["model", "dataset", "attack"])
    else:
        scenarios = _picture_scenarios(study.attack)
    if not scenarios:
        return NO_SNAPSHOTS
    markdown = ""
    for scenario, group in scenarios:
        mechs = mechanism_order(group)
        finals, originals, others = [], None, []
        for mech in mechs:
            run = group[group.mechanism == mech].iloc[0]
            with np.load(run.dir / "snapshots.npz") as npz:
                originals = npz["originals"] if originals is None else originals
                if npz["originals"].shape != originals.shape or not np.allclose(npz["originals"], originals):
                    others.append(mech)  # attacked other images: a column here would compare unlike with unlike
                else:
                    finals.append((f"{mech}\nSSIM {run.ssim:.2f}", npz["snapshots"][-1]))
        n = min(cfg.max_images, len(originals), *(len(f) for _, f in finals))
        title = f"Originals vs final reconstructions: {scenario_title(scenario)}"
        fig = _image_grid([("original", originals), *finals], n, title)
        name = f"{'privacy_' if privacy else ''}reconstructions_{_slug(*scenario)}.png"
        markdown += _save(fig, cfg.out / name, cfg.dpi)
        if others:
            markdown += f"_Left out of this grid (they attacked other images): {', '.join(others)}._\n"
    return markdown


def plot_reconstruction_evolution(study: Study, cfg: AnalysisConfig) -> str:
    """Per scenario and mechanism: each image's original, then its reconstruction at evenly spread snapshots."""
    scenarios = _picture_scenarios(study.attack)
    if not scenarios:
        return NO_SNAPSHOTS
    markdown = ""
    for scenario, group in scenarios:
        for mech in mechanism_order(group):
            run = group[group.mechanism == mech].iloc[0]
            with np.load(run.dir / "snapshots.npz") as npz:
                iterations, snapshots, originals = npz["iterations"], npz["snapshots"], npz["originals"]
            picks = np.unique(np.linspace(0, len(iterations) - 1, min(cfg.max_snapshots, len(iterations))).round())
            picks = picks.astype(int)
            n = min(cfg.max_images, len(originals), snapshots.shape[1])
            columns = [("original", originals), *((f"iteration {iterations[s]}", snapshots[s]) for s in picks)]
            fig = _image_grid(columns, n, f"Reconstruction over iterations: {mech}, {scenario_title(scenario)}")
            markdown += _save(fig, cfg.out / f"evolution_{_slug(*scenario, mech)}.png", cfg.dpi)
    return markdown


def _empty(ax: plt.Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="grey", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _privacy_panel(
    ax: plt.Axes, frame: pd.DataFrame, mode: str, target: str, value: str, by: list[str], release: bool = False
) -> bool:
    """value against ε for DP runs (mean ± std over seeds at each target ε, placed at the training run's ε
    spent), with plain (ε = ∞) and regularized (no ε) training as horizontal reference lines in the same
    colour. `release`: label each DP point with the ε of the one release the server attacked. False when
    there is nothing to draw."""
    if frame.empty:
        return False
    epsilons = []
    for i, (key, group) in enumerate(frame.groupby(by)):
        color, name = f"C{i}", " / ".join(str(k) for k in key)
        dp = group[group[mode] == "dp-sgd"]
        if not dp.empty:
            at = dp.assign(eps=dp.epsilon.fillna(dp[target])).groupby(target, dropna=False)
            mean, std = at[value].mean(), at[value].std(ddof=0)
            ax.errorbar(at.eps.mean(), mean, yerr=std, color=color, marker="o", capsize=3, label=f"{name}: DP-SGD")
            epsilons += list(at.eps.mean().round(1))
            if release:
                for x, y, r in zip(at.eps.mean(), mean, at.release_epsilon.mean(), strict=True):
                    if pd.notna(r):
                        ax.annotate(f"release ε {r:.1f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
        for mode_name, style, label in (("none", "--", "plain (ε = ∞)"), ("regularized", ":", "regularized (no ε)")):
            reference = group[group[mode] == mode_name][value]
            if not reference.empty:
                ax.axhline(reference.mean(), color=color, ls=style, label=f"{name}: {label}")
    if epsilons:
        _log_axis(ax, epsilons)
    ax.set_xlabel("ε of the whole training run (δ = 1e-5, log scale; plain training has ε = ∞)")
    return True


def _risk_panel(ax: plt.Axes, train: pd.DataFrame, attack: pd.DataFrame, prior: pd.DataFrame) -> bool:
    """Probability of reconstruction against ε: the bound on any attack against a prior of 10 candidates
    (risk.py) for the whole training run and for the one release the server attacked, beside the share of
    images each attack made recognisable at the same ε (`success`), and the prior-aware attack's success (with
    its 95 % interval) beside the bound for the training it watched. False when there is no DP-SGD row."""
    epsilons = []
    train = train[train.privacy == "dp-sgd"] if "reconstruction_bound" in train else train.iloc[:0]
    if not train.empty:
        at = train.groupby("target_epsilon")
        ax.plot(at.epsilon.mean(), at.reconstruction_bound.mean(), "k-o", label="bound on any attack: whole run")
        epsilons += list(at.epsilon.mean().round(1))
    dp = attack[attack.mechanism_name == "dp-sgd"] if "release_bound" in attack else attack.iloc[:0]
    if not dp.empty:
        dp = dp.assign(eps=dp.epsilon.fillna(dp.strength))
        at = dp.groupby("strength")
        ax.plot(at.eps.mean(), at.release_bound.mean(), "k--s", label="bound on any attack: the release attacked")
        for i, (name, group) in enumerate(dp.groupby("attack")):
            at = group.groupby("strength")
            ax.plot(at.eps.mean(), at.success.mean(), "o", color=f"C{i}", ms=8, label=f"{name}: share recognisable")
        epsilons += list(dp.eps.round(1))
    for i, (dataset, group) in enumerate(prior.groupby("dataset")):
        group = group.sort_values("epsilon")
        err = [group.success_rate - group.success_low, group.success_high - group.success_rate]
        name = (
            f"prior-aware ({dataset}, its own training: q = {group.sample_rate.iloc[0]:g}, T = {group.steps.iloc[0]:g})"
        )
        ax.errorbar(group.epsilon, group.success_rate, yerr=err, color=f"C{i + 5}", marker="D", capsize=3, ls="none",
                    label=f"{name}: 95 % interval")  # fmt: skip
        ax.plot(group.epsilon, group.bound, color=f"C{i + 5}", ls=":", label=f"bound on any attack, {name}")
        epsilons += list(group.epsilon)
    if not epsilons:
        return False
    _log_axis(ax, epsilons)
    ax.set(ylim=(-0.03, 1.03), xlabel="ε of the whole training run (δ = 1e-5, log scale)")
    ax.axhline(0.1, color="grey", lw=1, label="baseline: a guess among 10 (κ = 0.1)")
    return True


def plot_tradeoff(study: Study, cfg: AnalysisConfig) -> str:
    """The study's question in one picture: per model, what each privacy setting costs in test accuracy (left),
    what it buys against the strongest attack (final SSIM and PSNR of `auto` where it ran, else of each
    attack, at the same ε; each DP point labelled with the ε of the one release the server attacked), and what
    ε guarantees against any reconstruction beside the success measured (right)."""
    attack = smallest_batch(study.attack)
    attack = strongest(attack[attack.mechanism_name.isin(PRIVACY_ORDER)])
    hits = study.images.assign(hit=study.images.ssim >= cfg.ssim_threshold).groupby("run").hit.mean()
    attack = attack.assign(success=attack.run.map(hits))
    models = sorted(set(study.train.model) | set(attack.model) | set(study.prior.model))
    if not models:
        return "_Skipped: no training runs and no attack runs with mechanism none, dp-sgd or regularized._\n"
    fig, axes = plt.subplots(len(models), 4, figsize=(21, 4.2 * len(models)), squeeze=False, layout="constrained")
    for row, model in zip(axes, models, strict=True):
        train = study.train[study.train.model == model]
        if _privacy_panel(row[0], train, "privacy", "target_epsilon", "accuracy", ["dataset"]):
            row[0].legend(fontsize=7)
        else:
            _empty(row[0], f"no training runs of {model}\n(uv run train.py --models {model})")
        row[0].set(ylabel="test accuracy", title=f"{model}: utility")
        runs = attack[attack.model == model]
        for ax, metric in zip(row[1:3], ["ssim", "psnr"], strict=True):
            if not _privacy_panel(ax, runs, "mechanism_name", "strength", metric, ["attack", "dataset"], True):
                _empty(ax, f"no attack runs on {model}\n(uv run gradient_attack.py after uv run train.py)")
                continue
            if metric == "ssim":
                ax.axhline(cfg.ssim_threshold, color="grey", lw=1, label=f"threshold {cfg.ssim_threshold}")
            ax.legend(fontsize=7)
        row[1].set(ylabel="final SSIM (1 = exact copy)", title=f"{model}: leakage (SSIM)")
        row[2].set(ylabel="final PSNR (dB)", title=f"{model}: leakage (PSNR)")
        if _risk_panel(row[3], train, runs, study.prior[study.prior.model == model]):
            row[3].legend(fontsize=7)
        else:
            _empty(row[3], f"no DP-SGD runs of {model}")
        row[3].set(ylabel="probability of reconstruction", title=f"{model}: what ε guarantees (prior of 10)")
    return _save(fig, cfg.out / "privacy_tradeoff.png", cfg.dpi)


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
    fig, axes = plt.subplots(2, len(names), figsize=(5 * len(names), 8), squeeze=False, layout="constrained")
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
                    label=scenario_title(scenario),
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
    """Per attack (one row each): success rate and mean final PSNR against the batch size the victim's update was
    computed on, one line per mechanism run at several batch sizes."""
    runs = study.attack[study.attack.groupby([*SCENARIO, "mechanism"]).batch_size.transform("nunique") >= 2]
    if runs.empty:
        return "_Skipped: every attack ran at a single batch size; sweep it with `uv run gradient_attack.py --batch-sizes 1 2 4 8`._\n"
    colors = _colors(mechanism_order(study.attack))
    scenarios = runs.groupby(SCENARIO)
    fig, axes = plt.subplots(len(scenarios), 2, figsize=(12, 4.2 * len(scenarios)), squeeze=False, layout="constrained")
    for (ax_success, ax_psnr), (scenario, group) in zip(axes, scenarios, strict=True):
        for mech in mechanism_order(group):
            images = study.images.merge(group[group.mechanism == mech][["run", "batch_size"]], on="run")
            by_size = images.groupby("batch_size")
            success = by_size.ssim.apply(lambda s: (s >= cfg.ssim_threshold).mean())
            ax_success.plot(success.index, success.values, color=colors[mech], marker="o", label=mech)
            mean, std = by_size.psnr.mean(), by_size.psnr.std(ddof=0)
            ax_psnr.errorbar(mean.index, mean, yerr=std, color=colors[mech], marker="o", capsize=3, label=mech)
        ax_success.set(ylabel=f"success rate (share of images with SSIM ≥ {cfg.ssim_threshold})", ylim=(-0.05, 1.05))
        ax_psnr.set(ylabel="final PSNR (dB, mean ± std over images)")
        for ax in (ax_success, ax_psnr):
            _log_axis(ax, group.batch_size, base=2)
            ax.set(title=scenario_title(scenario), xlabel="batch size (images per shared update, log scale)")
            ax.legend(fontsize=7)
    return _save(fig, cfg.out / "batch_size.png", cfg.dpi)


def plot_fedavg_leakage(rows: pd.DataFrame, path: Path, dpi: int = 150, threshold: float = 25.0) -> str:
    """Leakage against local work: the share of a client's images recovered (PSNR ≥ threshold) and their mean
    PSNR against the local SGD steps behind its FedAvg update, one line per mechanism (solid: the attack named
    first in `rows`, the one modelling the local training; dashed: the others, e.g. the ig-weight baseline).
    `rows`: one row per run with columns local_steps, mechanism, attack, recovered, psnr."""
    colors = _colors(list(dict.fromkeys(rows.mechanism)))
    main = rows.attack.iloc[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for (mech, attack), group in rows.groupby(["mechanism", "attack"], sort=False):
        by_steps = group.groupby("local_steps")
        style = "-" if attack == main else "--"
        for ax, column in zip(axes, ("recovered", "psnr"), strict=True):
            values = by_steps[column].mean()
            ax.plot(values.index, values.values, style, color=colors[mech], marker="o", label=f"{mech} ({attack})")
    axes[0].set(ylabel=f"recovered share of the client's images (PSNR ≥ {threshold:g} dB)", ylim=(-0.05, 1.05))
    axes[1].set(ylabel="mean PSNR of the client's images (dB)")
    for ax in axes:
        _log_axis(ax, rows.local_steps)
        ax.set(
            xlabel="local SGD steps behind the shared update (log scale)", title="FedAvg: leakage against local work"
        )
        ax.legend(fontsize=7)
    return _save(fig, path, dpi)
