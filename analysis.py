"""The analysis step: turns the finished runs under runs/ into print-quality figures and static/report.md with
the classification benchmark, the attack table and the breaking-point table. It never trains or attacks: it
reads only what train.py (runs/train) and gradient_attack.py (runs/attack) wrote (results.py), draws the figures
(figures.py) and writes the report. Malformed or unfinished runs are skipped with a warning naming the file, on
stderr and at the end of the report.

    uv run analysis.py
    uv run analysis.py --runs runs --out static --ssim-threshold 0.5 --dpi 200
"""

from __future__ import annotations

import re
import sys

import pandas as pd

import config
import figures
from config import AnalysisConfig
from results import (
    SCENARIO,
    Study,
    benchmark_table,
    breaking_points,
    load_study,
    mean_std,
    mechanism_order,
    sweep_table,
    with_bounds,
)
from utils import atomic_write_text, check_output, markdown_table, run_cli


def attack_table(study: Study, threshold: float) -> str:
    """Mechanism x attack: PSNR, SSIM, MSE as mean ± std over images (pooled across seeds); label accuracy and
    success rate as shares of those images; for DP-SGD the whole training run's ε and the ε of the one
    release the server attacked (a Gaussian mechanism on a batch that holds the target), with that release's
    bound on any reconstruction against 10 and against --prior-size candidates (risk.py). Success is recounted here at the report's SSIM threshold, so the
    table, the breaking points and the batch-size figure all draw the same line."""
    header = ["Victim", "Dataset", "Attack", "Mechanism", "ε (run / release)", "Batch", "Images", "PSNR (dB)", "SSIM"]
    header += ["MSE", "Label acc.", f"Success rate (SSIM ≥ {threshold})", "Any reconstruction ≤ (1 of 10 / 1 of n)"]
    rows = []
    for scenario, group in study.attack.groupby(SCENARIO):
        for mech in mechanism_order(group):
            for batch, runs in group[group.mechanism == mech].groupby("batch_size"):
                images = study.images[study.images.run.isin(runs.run)]
                scores = [mean_std(images.psnr, 2), mean_std(images.ssim), mean_std(images.mse, 4)]
                rates = [images.label_correct.mean(), (images.ssim >= threshold).mean()]
                epsilon = mean_std(runs.epsilon, 2)
                if runs.release_epsilon.notna().any():
                    epsilon += f" / {mean_std(runs.release_epsilon, 2)}"
                bound = "--"
                if runs.get("release_bound", pd.Series(dtype=float)).notna().any():
                    n = int(runs.prior_size.iloc[0])
                    bound = f"{runs.release_bound.mean():.3f} / {runs.release_bound_prior.mean():.3f} (n = {n})"
                rows.append([*scenario, mech, epsilon, int(batch), len(images), *scores, *rates, bound])
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
    note = (
        f"\nThe breaking point is the weakest strength from which on every stronger one keeps the final SSIM (mean "
        f"over images) below {threshold}; a dip below the line that does not last is not a break.\n\n"
    )
    return note + markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------- the report


def prior_table(prior: pd.DataFrame) -> str:
    """The prior-aware attack's runs: its success among the prior's candidates, with the 95 % Clopper–Pearson
    interval, beside the bound on any attack for the same training (z, q, T) and prior."""
    header = ["Model", "Dataset", "ε", "z", "q", "T", "Prior", "Trials", "Success (95 % interval)", "Bound"]
    rows = [
        [r.model, r.dataset, f"{r.epsilon:g}", f"{r.noise_multiplier:.2f}", f"{r.sample_rate:g}", int(r.steps),
         int(r.prior_size), int(r.trials), f"{r.success_rate:.2f} ({r.success_low:.2f}–{r.success_high:.2f})",
         f"{r.bound:.2f}"]
        for r in prior.sort_values(["model", "dataset", "epsilon"]).itertuples()
    ]  # fmt: skip
    return markdown_table(header, rows)


def build_report(study: Study, cfg: AnalysisConfig) -> str:
    """Write every figure whose inputs exist and return report.md's text, sections in reading order."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    no_train = f"_No finished training runs under {cfg.runs}/train: run `uv run train.py` to make them._\n"
    sections = {
        "Classification benchmark": (
            benchmark_table(study.train.to_dict("records")) if not study.train.empty else no_train
        ),
        "Privacy–utility–leakage trade-off": figures.plot_tradeoff(study, cfg),
    }
    if study.attack.empty:
        sections["Leakage study"] = (
            f"_No finished attack runs under {cfg.runs}/attack: run `uv run gradient_attack.py` to make them._\n"
        )
    else:
        sweeps = sweep_table(study)
        breaks = breaking_points(sweeps, cfg.ssim_threshold)
        ssim, loss = "SSIM (1 = exact copy)", "gradient-matching loss (log scale)"
        sections |= {
            "Attack results": attack_table(study, cfg.ssim_threshold),
            "SSIM evolution": figures.plot_evolution(study, cfg, "ssim", ssim, "ssim_evolution"),
            f"SSIM evolution, mechanisms that still leak (final median SSIM ≥ {cfg.ssim_threshold})": (
                figures.plot_evolution(study, cfg, "ssim", ssim, "ssim_evolution_filtered", leaking_only=True)
            ),
            "Loss evolution": figures.plot_evolution(study, cfg, "loss", loss, "loss_evolution"),
            "What each privacy mode leaves to the strongest attack": (
                figures.plot_reconstruction_grids(study, cfg, privacy=True)
            ),
            "Originals vs final reconstructions": figures.plot_reconstruction_grids(study, cfg),
            "Reconstruction evolution": figures.plot_reconstruction_evolution(study, cfg),
            "Defense sensitivity": (
                figures.plot_sensitivity(sweeps, breaks, cfg) + breaking_table(breaks, cfg.ssim_threshold)
            ),
            "Batch-size impact": figures.plot_batch_size(study, cfg),
        }
    if not study.prior.empty:
        sections["Prior-aware attack against the bound"] = prior_table(study.prior)
    if study.problems:
        sections["Skipped runs and files"] = "".join(f"- {p}\n" for p in study.problems)
    intro = (
        f"Made by `uv run analysis.py` from {len(study.train)} training and {len(study.attack)} attack runs under "
        f"`{cfg.runs}`. An attack counts as stopped where the final SSIM falls below {cfg.ssim_threshold}. "
        "Scores are mean ± std over images (attacks) or seeds (training) where there are several; curves over "
        "mechanisms use each scenario's smallest batch size.\n"
    )
    return "# Gradient leakage: report\n\n" + intro + "".join(f"\n## {t}\n\n{body}" for t, body in sections.items())


def figure_links(report: str) -> set[str]:
    return set(re.findall(r"!\[[^\]]*\]\(([^)/]+\.png)\)", report))


def main(args: list[str] | None = None) -> None:
    cfg = config.parse(AnalysisConfig, args)
    check_output(cfg.out)
    study = with_bounds(load_study(cfg.runs), cfg.prior_size)
    for problem in study.problems:
        print(f"warning: {problem}", file=sys.stderr)
    previous = cfg.out / "report.md"
    stale = figure_links(previous.read_text(errors="replace")) if previous.is_file() else set()
    report = build_report(study, cfg)
    atomic_write_text(cfg.out / "report.md", report)
    for name in stale - figure_links(report):  # figures an earlier report drew and this one does not
        (cfg.out / name).unlink(missing_ok=True)
    print(
        f"wrote {cfg.out / 'report.md'} and its figures ({len(study.train)} training, {len(study.attack)} attack runs)"
    )


if __name__ == "__main__":
    run_cli(main)
