"""The study's results as data: reads the finished run directories under runs/ (the contracts in DESIGN.md)
into tables, and derives what the figures and the report share: which runs compare, in which order, and where
each defense stops the attack; and renders the classification benchmark, the one table that train.py prints and
the report shows.

A run directory without metrics.json is unfinished and skipped; one whose metrics.json is malformed is skipped,
and one whose trajectory.csv or snapshots.npz is malformed is left out of the figures that need that file. Each
skip is recorded with the file's name (Study.problems): one bad run never hides the rest, and nothing is dropped
silently.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from risk import release_bounds, run_bounds
from utils import UsageError, read_json

TRAIN_KEYS = ["run", "dataset", "model", "privacy", "target_epsilon", "epsilon", "accuracy", "precision", "recall"]
TRAIN_KEYS += ["specificity", "f1", "mcc", "seed"]
TRAIN_EXTRAS = [
    "pretrained",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "audit_epsilon",
    "audit_fdp_epsilon",
]  # empty where a run lacks them
ATTACK_KEYS = ["run", "victim", "dataset", "attack", "mechanism", "mechanism_name", "strength", "epsilon"]
ATTACK_KEYS += ["batch_size", "num_images", "loss", "mse", "psnr", "ssim", "seed"]
ATTACK_EXTRAS = ["model", "release_epsilon", "noise_multiplier"]  # newer runs' columns; empty for older ones
IMAGE_KEYS = ["image", "mse", "psnr", "ssim", "label_correct"]
PRIOR_KEYS = ["run", "model", "dataset", "epsilon", "noise_multiplier", "sample_rate", "steps", "prior_size"]
PRIOR_KEYS += ["trials", "success_rate", "success_low", "success_high", "bound"]
TRAJECTORY_COLUMNS = ["image", "iteration", "loss", "ssim"]
SNAPSHOT_KEYS = ["iterations", "snapshots", "originals"]
SCENARIO = ["victim", "dataset", "attack"]  # one attack on one model and dataset: figures compare within it

PRIVACY_ORDER = ["none", "dp-sgd", "regularized"]
# The benchmark's wording, as the README's table shows it (pasted from train.py's output).
PRIVACY_LABELS = {"none": "Traditional Training", "dp-sgd": "DP-SGD", "regularized": "Explicit Regularization"}
MODEL_TITLES = {
    "cnn": "Convolutional Neural Network (custom CNN)",
    "lenet": "LeNet (DLG)",
    "mlp": "Multilayer Perceptron",
    "fcnn": "Fully Connected Network",
    "resnet50": "Pretrained ResNet50 (fine-tuning only the classification head)",
    "dinov2": "Pretrained DINOv2 with registers (ViT-S/14, fine-tuning only the classification head)",
}
BENCHMARK_METRICS = ["accuracy", "precision", "recall", "specificity", "f1", "mcc"]
MECHANISM_ORDER = ["none", "dp-sgd", "regularized", "noise", "prune", "quantize", "topk", "secagg"]
# Which way "stronger" runs for each defense's strength: +1 = a larger value protects more (more noise, more
# pruning, more clients summed), -1 = a smaller one does (a smaller ε, fewer bits, fewer coordinates kept).
STRONGER = {"noise": 1, "prune": 1, "secagg": 1, "dp-sgd": -1, "quantize": -1, "topk": -1}


@dataclass
class Study:
    """Everything the figures and tables need, read once from runs/."""

    train: pd.DataFrame  # one row per finished training run (its metrics.json)
    attack: pd.DataFrame  # one row per finished attack run (its metrics.json), plus its directory and files
    images: pd.DataFrame  # one row per attacked image of every attack run (metrics.json's per_image)
    trajectories: pd.DataFrame  # every readable trajectory.csv, with the run's name
    problems: list[str] = field(default_factory=list)  # skipped runs and files, for stderr and the report
    prior: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=PRIOR_KEYS))  # prior-aware runs


def _run_dirs(study_dir: Path) -> list[Path]:
    if not study_dir.is_dir():
        return []
    return sorted(d for d in study_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


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
    if not isinstance(metrics, dict):
        problems.append(f"{path} holds a JSON {type(metrics).__name__}, not an object of metrics; the run is skipped.")
        return None
    missing = [k for k in keys if k not in metrics]
    if missing:
        problems.append(f"{path} lacks {', '.join(missing)}; the run is skipped.")
        return None
    wrong = [k for k in keys if k in NUMERIC and not _is_number(metrics[k])]
    if wrong:
        problems.append(
            f"{path}: {', '.join(f'{k} = {metrics[k]!r}' for k in wrong)} is not a number; the run is skipped."
        )
        return None
    return metrics


NUMERIC = {"target_epsilon", "epsilon", "accuracy", "precision", "recall", "specificity", "f1", "mcc", "seed"}
NUMERIC |= {"strength", "batch_size", "num_images", "loss", "mse", "psnr", "ssim", "label_correct"}


def _is_number(value: Any) -> bool:
    """A JSON number or null (missing): what every numeric field of a run's metrics must be."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, str))


def _read_attack_run(run_dir: Path, problems: list[str]) -> dict | None:
    """An attack run's metrics plus which of its per-iteration files are usable."""
    metrics = _read_metrics(run_dir, [*ATTACK_KEYS, "per_image"], problems)
    if metrics is None:
        return None
    per_image = metrics["per_image"]
    whole = isinstance(per_image, list) and all(isinstance(r, dict) and set(IMAGE_KEYS) <= set(r) for r in per_image)
    if not whole or not all(_is_number(r[k]) for r in per_image for k in IMAGE_KEYS):
        problems.append(
            f"{run_dir / 'metrics.json'}: per_image must list {{{', '.join(IMAGE_KEYS)}}} as numbers; skipped."
        )
        return None
    snapshots = run_dir / "snapshots.npz"
    try:
        with np.load(snapshots) as npz:
            lacking = [k for k in SNAPSHOT_KEYS if k not in npz.files]
            trouble = f"lacks {', '.join(lacking)}" if lacking else _snapshot_trouble(npz)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        trouble = f"is unreadable ({err})"
    if trouble:
        problems.append(f"{snapshots} {trouble}; the reconstruction figures leave this run out.")
    return metrics | {"dir": run_dir, "has_snapshots": not trouble}


def _snapshot_trouble(npz: Any) -> str:
    """What is wrong with a snapshots.npz whose arrays are all there ('' when nothing): numbers of the shapes the
    figures draw (iterations (T,), snapshots (T, N, *shape), originals (N, *shape))."""
    iterations, snapshots, originals = (npz[k] for k in SNAPSHOT_KEYS)
    if not all(np.issubdtype(a.dtype, np.number) for a in (iterations, snapshots, originals)):
        return "holds arrays that are not numbers"
    if iterations.ndim != 1 or snapshots.shape[:1] != iterations.shape or snapshots.shape[2:] != originals.shape[1:]:
        return f"has arrays of shapes that do not fit ({iterations.shape}, {snapshots.shape}, {originals.shape})"
    return ""


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
    attack_dirs = _run_dirs(runs / "attack") + federated_attack_dirs(runs / "federated")
    prior = [m for d in attack_dirs if _prior_aware(d) and (m := _read_metrics(d, PRIOR_KEYS, problems))]
    attack = [m for d in attack_dirs if not _prior_aware(d) and (m := _read_attack_run(d, problems))]
    if not train and not attack and not prior:
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
    numeric += ["release_epsilon", "noise_multiplier"]
    train_frame = pd.DataFrame(train, columns=[*TRAIN_KEYS, *TRAIN_EXTRAS])
    attack_frame = pd.DataFrame(attack, columns=[*ATTACK_KEYS, *ATTACK_EXTRAS, "dir", "has_snapshots"])
    # the victim's architecture: recorded by newer runs; a train.py run's model, or the victim's name, before
    architectures = dict(zip(train_frame.run, train_frame.model, strict=True))
    known = attack_frame.model.astype(object)
    attack_frame["model"] = known.where(known.notna(), attack_frame.victim.map(architectures))
    attack_frame["model"] = attack_frame.model.where(attack_frame.model.notna(), attack_frame.victim)
    for frame in (train_frame, attack_frame):
        cols = [c for c in numeric if c in frame.columns]
        frame[cols] = frame[cols].apply(pd.to_numeric, errors="coerce")
    return Study(
        train=train_frame,
        attack=attack_frame,
        images=pd.DataFrame(images, columns=["run", *IMAGE_KEYS]).astype({k: float for k in IMAGE_KEYS}),
        trajectories=pd.concat(trajectories) if trajectories else pd.DataFrame(columns=["run", *TRAJECTORY_COLUMNS]),
        problems=problems,
        prior=pd.DataFrame(prior, columns=PRIOR_KEYS),
    )


def federated_attack_dirs(federated: Path) -> list[Path]:
    """The attack runs of federated.py's runs (runs/federated/<run>/attacks/<attack>-r<round>/): the same files
    and summary row as a gradient-mode run, so they join the attack table, its victim the federated run."""
    return [d for run in _run_dirs(federated) for d in _run_dirs(run / "attacks")]


def _prior_aware(run_dir: Path) -> bool:
    """A prior-aware run (prior_study.py): trials of whole trainings, no images."""
    try:
        return read_json(run_dir / "metrics.json").get("attack") == "prior-aware"
    except (OSError, ValueError, AttributeError):
        return False


def with_bounds(study: Study, prior_size: int) -> Study:
    """The study with its reconstruction bounds (risk.py), read off what each run recorded: a DP-SGD training
    run's for the whole run, a dp-sgd attack row's for the one release attacked; against 10 candidates and
    against `prior_size`. Non-DP rows get none."""
    train = study.train.to_dict("records")
    attack = study.attack.to_dict("records")
    return replace(
        study,
        train=pd.concat(
            [study.train, pd.DataFrame([run_bounds(r, prior_size) for r in train], index=study.train.index)], axis=1
        ),
        attack=pd.concat(
            [study.attack, pd.DataFrame([release_bounds(r, prior_size) for r in attack], index=study.attack.index)],
            axis=1,
        ),
    )


def smallest_batch(attack: pd.DataFrame) -> pd.DataFrame:
    """Each scenario's runs at its smallest batch size: curves across mechanisms compare like with like (batch
    size has a figure of its own)."""
    return attack[attack.batch_size == attack.groupby(SCENARIO).batch_size.transform("min")]


def strongest(attack: pd.DataFrame) -> pd.DataFrame:
    """The runs that answer "what does this privacy setting buy": `auto`'s (the strongest attack the server can
    choose) for every model and dataset it ran on, every attack's elsewhere."""
    has_auto = attack.groupby(["model", "dataset"]).attack.transform(lambda names: (names == "auto").any())
    return attack[~has_auto.astype(bool) | (attack.attack == "auto")]


def mechanism_order(frame: pd.DataFrame) -> list[str]:
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


def scenario_title(scenario: tuple) -> str:
    victim, dataset, attack = scenario
    return f"{attack} on {victim} ({dataset})"


def sweep_table(study: Study) -> pd.DataFrame:
    """Final SSIM and PSNR (mean and std over images, pooled across seeds) per scenario, defense and strength,
    for the defenses run at two or more strengths."""
    runs = smallest_batch(study.attack)
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


# ------------------------------------------------------------------------------------ the benchmark table


def _number(value: Any) -> float | None:
    """A summary cell as a number: summary.csv gives strings ('' when missing), a Study's frame NaN."""
    if value is None or value == "":
        return None
    number = float(value)
    return None if np.isnan(number) else number


def mean_std(values: Iterable[float | None], digits: int = 3) -> str:
    """'mean ± std' (population std over images or seeds) where there are several values, the value alone where
    there is one, '--' where there is none."""
    values = np.asarray(list(values), dtype=float)  # None becomes NaN
    values = values[~np.isnan(values)]
    if values.size == 0:
        return "--"
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def model_title(row: Mapping[str, Any]) -> str:
    """A model's name in the benchmark; a backbone built without its pretrained weights says so."""
    model, pretrained = row["model"], row.get("pretrained")
    if str(pretrained) in ("False", "false", "0"):  # summary.csv gives strings, a Study's frame booleans
        return f"{model} with random weights (no pretrained weights; head only)"
    return MODEL_TITLES.get(model, model)


# Columns the benchmark shows where some run has them: what ε guarantees and what an audit found.
EXTRA_COLUMNS = {
    "reconstruction_bound": "Reconstruction ≤ (1 of 10)",
    "audit_epsilon": "Audit ε ≥ (Steinke, 95 %)",
    "audit_fdp_epsilon": "Audit ε ≥ (f-DP, 95 %)",
}


def benchmark_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The classification benchmark in Markdown, one renderer for train.py's summary.md and the report, so the
    two never drift apart. `rows` are summary rows (summary.csv dicts of strings, or a Study's train records).

    One block per dataset and model (a backbone with random weights apart), in the order the rows first name them; in each, Traditional Training (ε ∞),
    DP-SGD from the smallest target ε up, then Explicit Regularization (no formal ε: '--'). Rows of the same
    setting are seeds: several give 'mean ± std' and a Seeds column, one gives plain numbers (so a one-seed
    study prints the table the README shows). ε spent is the accountant's, as each run recorded it; where runs
    have them, the bound on any reconstruction against 10 candidates (risk.py) and the one-run audits' ε lower
    bounds (audit.py: Steinke et al.'s and the f-DP one) follow it."""
    rank = {p: i for i, p in enumerate(PRIVACY_ORDER)}
    blocks: dict[tuple[str, str], dict[tuple[str, float | None], list[Mapping[str, Any]]]] = {}
    for row in rows:
        block = blocks.setdefault((row["dataset"], model_title(row)), {})
        block.setdefault((row["privacy"], _number(row["target_epsilon"])), []).append(row)
    seeded = any(len(runs) > 1 for block in blocks.values() for runs in block.values())
    rows = [r for block in blocks.values() for runs in block.values() for r in runs]
    extra = [c for c in EXTRA_COLUMNS if any(_number(r.get(c)) is not None for r in rows)]
    header = ["Model", "ε", "Accuracy", "Precision", "Recall/Sensitivity", "Specificity", "F1", "MCC", "ε spent"]
    header += [EXTRA_COLUMNS[c] for c in extra] + (["Seeds"] if seeded else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for (dataset, title), block in blocks.items():
        lines.append(f"| **{title} on {dataset}** " + "|" * len(header))
        for privacy, target in sorted(block, key=lambda s: (rank.get(s[0], len(rank)), s[0], s[1] or 0.0)):
            runs = block[privacy, target]
            target_cell = "∞" if privacy == "none" else "--" if target is None else f"{target:g}"
            label = PRIVACY_LABELS.get(privacy, privacy) + ("" if target is None else f" (ε={target_cell})")
            scores = [mean_std(_number(r[m]) for r in runs) for m in BENCHMARK_METRICS]
            spent = "∞" if privacy == "none" else mean_std(_number(r["epsilon"]) for r in runs)
            more = [mean_std(_number(r.get(c)) for r in runs) for c in extra]
            cells = [label, target_cell, *scores, spent, *more] + ([str(len(runs))] if seeded else [])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
