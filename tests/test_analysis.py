"""analysis.py on a small synthetic runs/ tree whose numbers the tests chose, so the figures, tables and breaking
points can be checked against known answers."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import analysis
import results
import training
from risk import reconstruction_bound, run_bounds
from utils import read_csv, run_cli, write_csv, write_json, write_summary

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRAIN_ACCURACY = {("none", None): 0.9, ("dp-sgd", 8.0): 0.61, ("dp-sgd", 25.0): 0.7, ("dp-sgd", 50.0): 0.8}
TRAIN_ACCURACY[("regularized", None)] = 0.85
# mechanism spec -> final mean SSIM over the two images (they sit at ±0.02 around it)
ATTACK_SSIM = {
    "none": 0.95,
    "regularized": 0.85,
    "dp-sgd:50": 0.6,
    "dp-sgd:8": 0.1,
    "noise:0.001": 0.7,
    "noise:0.01": 0.3,  # breaking point: below 0.5 from here on
    "noise:0.1": 0.1,
    "quantize:4": 0.6,
    "quantize:2": 0.2,  # fewer bits are stronger: breaks at 2
    "topk:0.5": 0.8,
    "topk:0.2": 0.4,  # a dip below the line that does not last: not the breaking point
    "topk:0.1": 0.6,
    "topk:0.05": 0.2,  # breaks at 0.05
}
BATCH_SSIM = {2: 0.5, 4: 0.3}  # mechanism none at batch sizes 2 (images at 0.52, 0.48) and 4 besides 1
EXPECTED_BREAKS = {"noise": "0.01", "quantize": "2", "topk": "0.05", "dp-sgd": "8"}


def _psnr(ssim: float) -> float:
    return 10 + 20 * ssim


def write_train_run(root: Path, privacy: str, target: float | None, accuracy: float, seed: int = 0) -> None:
    run = f"cnn-{privacy}" + (f"-eps{target:g}" if target else "") + (f"-seed{seed}" if seed else "")
    row = dict(run=run, dataset="faces", model="cnn", privacy=privacy, target_epsilon=target)
    row |= dict(epsilon=target - 0.02 if target else None, delta=1e-5, noise_multiplier=1.1 if target else None)
    row |= dict(max_grad_norm=1.0, sample_rate=0.1, steps=300, epochs=30, accuracy=accuracy, precision=accuracy)
    row |= dict(recall=accuracy - 0.1, specificity=accuracy + 0.05, f1=accuracy - 0.05, mcc=2 * accuracy - 1)
    row |= dict(train_seconds=12.0, samples_per_second=800.0, seed=seed)
    write_json(root / run / "config.json", {"run": run, "model": "cnn", "privacy": privacy, "target_epsilon": target})
    write_csv(
        root / run / "history.csv", [{"epoch": 1, "loss": 0.5, "train_accuracy": accuracy, "test_accuracy": accuracy}]
    )
    write_json(root / run / "metrics.json", row)


def write_attack_run(root: Path, mechanism: str, ssim: float, batch_size: int = 1, image_seed: int = 0) -> None:
    name, _, strength = mechanism.partition(":")
    run = f"cnn-faces-dlg-{mechanism.replace(':', '-')}-b{batch_size}"
    per_image = [
        dict(image=i, mse=10 ** (-_psnr(s) / 10), psnr=_psnr(s), ssim=s, label_correct=True)
        for i, s in enumerate([ssim + 0.02, ssim - 0.02])
    ]
    row = dict(run=run, victim="cnn", dataset="faces", attack="dlg", mechanism=mechanism, mechanism_name=name)
    row |= dict(
        strength=float(strength) if strength else None, epsilon=float(strength) - 0.1 if name == "dp-sgd" else None
    )
    row |= dict(release_epsilon=float(strength) * 0.4 if name == "dp-sgd" else None)
    row |= dict(batch_size=batch_size, num_images=2, iterations=20, restarts=1, loss=1e-3, seconds=1.0, seed=0)
    row |= dict(mse=np.mean([r["mse"] for r in per_image]), psnr=_psnr(ssim), ssim=ssim, label_accuracy=1.0)
    row |= dict(success_rate=np.mean([r["ssim"] >= 0.5 for r in per_image]), recovered_fraction=0.0)
    iterations = [0, 10, 20]
    trajectory = [
        dict(
            image=r["image"],
            batch=r["image"],
            iteration=it,
            loss=10.0 ** (1 - it / 5),
            mse=r["mse"],
            psnr=r["psnr"],
            ssim=r["ssim"] * it / 20,
            label_accuracy=1.0,
        )  # fmt: skip
        for r in per_image
        for it in iterations
    ]
    rng = np.random.default_rng(image_seed)
    originals = rng.random((2, 1, 8, 8), dtype=np.float32)
    snapshots = np.stack([originals * t / 20 for t in iterations])
    write_json(root / run / "config.json", {k: row[k] for k in ("run", "victim", "dataset", "attack", "mechanism")})
    write_csv(root / run / "trajectory.csv", trajectory)
    np.savez(root / run / "snapshots.npz", iterations=np.array(iterations), snapshots=snapshots, originals=originals,
             labels=np.array([0, 1]), recovered_labels=np.array([0, 1]))  # fmt: skip
    write_json(root / run / "metrics.json", row | {"per_image": per_image})


def make_runs(root: Path, train: bool = True, attack: bool = True) -> Path:
    """A plausible runs/ tree: one model trained plain / DP-SGD / regularized, one attack against many defenses."""
    if train:
        for (privacy, target), accuracy in TRAIN_ACCURACY.items():
            write_train_run(root / "train", privacy, target, accuracy)
        bounds = functools.partial(run_bounds, prior_size=100)
        write_summary(root / "train", training.SUMMARY_COLUMNS, results.benchmark_table, bounds)  # as train.py does
    if attack:
        for mechanism, ssim in ATTACK_SSIM.items():
            write_attack_run(root / "attack", mechanism, ssim)
        for batch_size, ssim in BATCH_SSIM.items():
            write_attack_run(root / "attack", "none", ssim, batch_size)
    return root


def run(args: list[str], capsys) -> tuple[int, str]:
    """analysis.py's command line in-process: exit code (0 when it returns) and stderr."""
    try:
        run_cli(lambda: analysis.main(args))
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def table_row(report: str, **cells: str) -> dict[str, str]:
    """The one row, as {column header: cell}, of the Markdown table whose header has the given columns and
    whose cells there equal the given values (a block's title row, one cell wide, is no row)."""
    rows, header = [], None
    for line in report.splitlines():
        values = [v.strip() for v in line.strip("|").split("|")] if line.startswith("|") else None
        if values is None or set(values) == {"---"}:
            header = header if values else None
        elif header is None:
            header = values
        elif set(cells) <= set(header) and len(values) == len(header):
            rows.append(dict(zip(header, values, strict=True)))
    matches = [r for r in rows if all(r[k] == v for k, v in cells.items())]
    assert len(matches) == 1, (cells, matches)
    return matches[0]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("study")
    make_runs(root / "runs")
    analysis.main(["--runs", str(root / "runs"), "--out", str(root / "static"), "--dpi", "50"])
    return root / "static", (root / "static" / "report.md").read_text()


def test_every_figure_is_written_as_a_valid_png_and_linked(full_report):
    out, report = full_report
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {"ssim_evolution.png", "ssim_evolution_filtered.png", "loss_evolution.png", "privacy_tradeoff.png"}
    expected |= {"defense_sensitivity.png", "batch_size.png", "reconstructions_cnn_faces_dlg.png"}
    expected |= {f"evolution_cnn_faces_dlg_{m.replace(':', '_')}.png" for m in ATTACK_SSIM}
    assert expected <= set(links), expected - set(links)
    assert "Skipped" not in report
    for link in links:
        assert (out / link).read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(out / link) as image:
            image.verify()
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


MODEL = "Model"  # the benchmark's first column: the block's title or the training's label


def test_classification_table_holds_the_runs_numbers(full_report):
    _, report = full_report
    assert "| **Convolutional Neural Network (custom CNN) on faces** ||||||||||\n" in report
    dp8 = table_row(report, **{MODEL: "DP-SGD (ε=8)"})
    assert (dp8["ε"], dp8["ε spent"], dp8["Accuracy"]) == ("8", "7.980", "0.610")  # the accountant's ε, not 8
    assert dp8["Reconstruction ≤ (1 of 10)"] == f"{reconstruction_bound(1.1, 0.1, 300, 10):.3f}"  # its z, q, T
    plain = table_row(report, **{MODEL: "Traditional Training"})
    assert plain["ε"] == plain["ε spent"] == "∞" and plain["Reconstruction ≤ (1 of 10)"] == "--"
    assert [plain[k] for k in ["Accuracy", "Precision", "Recall/Sensitivity", "Specificity", "F1", "MCC"]] == [
        "0.900", "0.900", "0.800", "0.950", "0.850", "0.800"
    ]  # fmt: skip
    regularized = table_row(report, **{MODEL: "Explicit Regularization"})
    assert (regularized["ε"], regularized["ε spent"], regularized["Accuracy"]) == ("--", "--", "0.850")
    assert "Seeds" not in report  # one seed each: plain numbers, as train.py prints them
    # rows read plain, DP-SGD from strongest to weakest, regularized, as in the seed study
    labels = ["Traditional Training", "DP-SGD (ε=8)", "DP-SGD (ε=25)", "DP-SGD (ε=50)", "Explicit Regularization"]
    order = [report.index(f"| {label} |") for label in labels]
    assert order == sorted(order)


def test_report_and_train_py_render_the_same_benchmark(full_report):
    """One renderer: summary.csv's strings (what train.py prints) and the report's frame give the same table."""
    out, report = full_report
    table = results.benchmark_table(read_csv(out.parent / "runs" / "train" / "summary.csv"))
    assert f"## Classification benchmark\n\n{table}" in report


def _summary_row(model: str, privacy: str, target: str = "", spent: str = "", accuracy: str = "0.5") -> dict:
    """A summary.csv row as utils.read_csv gives it: strings, '' where a value is missing."""
    row = dict(dataset="faces", model=model, privacy=privacy, target_epsilon=target, epsilon=spent, accuracy=accuracy)
    return row | dict.fromkeys(["precision", "recall", "specificity", "f1", "mcc"], "0.5")


def test_benchmark_table_groups_by_model_and_orders_privacy():
    rows = [_summary_row("cnn", "regularized"), _summary_row("cnn", "dp-sgd", "50", "49.993"),
            _summary_row("cnn", "dp-sgd", "8", "7.995", "0.96"), _summary_row("cnn", "none", accuracy="0.98"),
            _summary_row("resnet50", "none")]  # fmt: skip
    lines = results.benchmark_table(rows).splitlines()
    assert lines[:2] == [
        "| Model | ε | Accuracy | Precision | Recall/Sensitivity | Specificity | F1 | MCC | ε spent |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    labels = [line.split(" | ")[0][2:] for line in lines[2:]]
    assert labels == [
        "**Convolutional Neural Network (custom CNN) on faces** |||||||||",
        "Traditional Training", "DP-SGD (ε=8)", "DP-SGD (ε=50)", "Explicit Regularization",
        "**Pretrained ResNet50 (fine-tuning only the classification head) on faces** |||||||||",
        "Traditional Training",
    ]  # fmt: skip
    # the row format of the README's table, to the byte
    assert lines[3] == "| Traditional Training | ∞ | 0.980 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | ∞ |"
    assert lines[4] == "| DP-SGD (ε=8) | 8 | 0.960 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 7.995 |"
    assert lines[6] == "| Explicit Regularization | -- | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | 0.500 | -- |"


def test_benchmark_table_gives_mean_and_std_over_seeds():
    rows = [_summary_row("cnn", "dp-sgd", "8", "7.99", "0.9"), _summary_row("cnn", "dp-sgd", "8", "7.97", "0.8"),
            _summary_row("cnn", "none", accuracy="0.95")]  # fmt: skip
    table = results.benchmark_table(rows)
    dp8 = table_row(table, **{MODEL: "DP-SGD (ε=8)"})
    assert (dp8["Accuracy"], dp8["ε spent"], dp8["Seeds"]) == ("0.850 ± 0.050", "7.980 ± 0.010", "2")
    assert dp8["MCC"] == "0.500 ± 0.000"
    plain = table_row(table, **{MODEL: "Traditional Training"})
    assert (plain["Accuracy"], plain["Seeds"]) == ("0.950", "1")  # one seed: the plain number
    assert table.index("Traditional Training") < table.index("DP-SGD (ε=8)")


def test_report_pools_seeds_of_one_setting(tmp_path):
    runs = make_runs(tmp_path / "runs", attack=False)
    write_train_run(runs / "train", "dp-sgd", 8.0, 0.71, seed=1)
    analysis.main(["--runs", str(runs), "--out", str(tmp_path / "static"), "--dpi", "50"])
    report = (tmp_path / "static" / "report.md").read_text()
    dp8 = table_row(report, **{MODEL: "DP-SGD (ε=8)"})
    assert (dp8["Accuracy"], dp8["ε spent"], dp8["Seeds"]) == ("0.660 ± 0.050", "7.980 ± 0.000", "2")
    assert table_row(report, **{MODEL: "DP-SGD (ε=25)"})["Seeds"] == "1"


def test_attack_table_carries_mean_and_spread_over_images(full_report):
    _, report = full_report
    row = table_row(report, Mechanism="noise:0.001", Batch="1")
    assert row["SSIM"] == "0.700 ± 0.020"  # the two images sit at 0.72 and 0.68
    assert row["PSNR (dB)"] == f"{_psnr(0.7):.2f} ± 0.40"  # PSNR = 10 + 20 SSIM, so its std is 20 * 0.02
    assert row["Images"] == "2" and row["ε (run / release)"] == "--"
    dp = table_row(report, Mechanism="dp-sgd:8", Batch="1")["ε (run / release)"]
    assert dp == "7.90 / 3.20"  # the accountant's for the whole run (not the target 8), and for the one release
    assert table_row(report, Mechanism="none", Batch="2")["Success rate (SSIM ≥ 0.5)"] == "0.500"
    assert table_row(report, Mechanism="none", Batch="4")["Success rate (SSIM ≥ 0.5)"] == "0.000"
    assert table_row(report, Mechanism="none", Batch="4")["Label acc."] == "1.000"


def test_success_rate_follows_the_reports_threshold(full_report):
    out, _ = full_report
    table = analysis.attack_table(results.load_study(out.parent / "runs"), threshold=0.45)
    assert table_row(table, Mechanism="none", Batch="2")["Success rate (SSIM ≥ 0.45)"] == "1.000"


def test_breaking_points_are_found_where_the_data_put_them(full_report):
    _, report = full_report
    for mechanism, point in EXPECTED_BREAKS.items():
        assert table_row(report, Defense=mechanism)["Breaking point (SSIM < 0.5)"] == point


@pytest.mark.parametrize(
    ("strengths", "ssim", "stronger", "expected"),
    [
        ([1e-4, 1e-3, 1e-2], [0.9, 0.3, 0.1], 1, 1e-3),
        ([1e-2, 1e-4, 1e-3], [0.1, 0.9, 0.3], 1, 1e-3),  # order of the input does not matter
        ([8, 4, 2], [0.8, 0.6, 0.2], -1, 2),  # smaller is stronger
        ([0.5, 0.2, 0.1, 0.05], [0.8, 0.4, 0.6, 0.2], -1, 0.05),  # a passing dip is not a break
        ([1, 2, 3], [0.9, 0.8, 0.7], 1, None),  # still leaks at the strongest
        ([1, 2, 3], [0.2, 0.1, 0.0], 1, 1),  # broken already at the weakest
        ([1, 2], [0.9, float("nan")], 1, None),  # no SSIM (tabular data) is no evidence of a break
    ],
)
def test_breaking_point(strengths, ssim, stronger, expected):
    assert results.breaking_point(np.array(strengths), np.array(ssim), stronger, 0.5) == expected


def test_no_runs_exits_2_naming_the_commands_to_run(tmp_path, capsys):
    code, err = run(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "static")], capsys)
    assert code == 2
    assert "uv run train.py" in err and "uv run gradient_attack.py" in err
    assert not (tmp_path / "static").exists()


def test_bad_threshold_exits_2_naming_the_value(tmp_path, capsys):
    make_runs(tmp_path / "runs", attack=False)
    code, err = run(["--runs", str(tmp_path / "runs"), "--ssim-threshold", "1.5"], capsys)
    assert code == 2 and "1.5" in err


def test_malformed_runs_are_named_and_skipped(tmp_path, capsys):
    runs = tmp_path / "runs"
    for mechanism in ["none", "noise:0.1", "quantize:2"]:
        write_attack_run(runs / "attack", mechanism, ATTACK_SSIM[mechanism])
    broken = runs / "attack" / "cnn-faces-dlg-noise-0.1-b1"
    (broken / "metrics.json").write_text("{not json")
    no_trajectory = runs / "attack" / "cnn-faces-dlg-quantize-2-b1"
    (no_trajectory / "trajectory.csv").unlink()
    (runs / "attack" / "cnn-faces-dlg-unfinished").mkdir()
    code, err = run(["--runs", str(runs), "--out", str(tmp_path / "static"), "--dpi", "50"], capsys)
    assert code == 0
    report = (tmp_path / "static" / "report.md").read_text()
    for text in (err, report):
        assert f"{broken / 'metrics.json'} is not readable JSON" in text
        assert f"{no_trajectory / 'trajectory.csv'} is unusable" in text
        assert "cnn-faces-dlg-unfinished: no metrics.json" in text
    assert "| noise:0.1 |" not in report  # the broken run is gone from the tables
    table_row(report, Mechanism="quantize:2")  # the run without a trajectory is still in the attack table
    assert "run `uv run train.py`" in report  # the missing study is named, the rest is made


def test_only_malformed_runs_exit_2_naming_the_file(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "train" / "cnn-none"
    write_json(run_dir / "metrics.json", {"run": "cnn-none", "accuracy": 0.9})
    code, err = run(["--runs", str(tmp_path / "runs")], capsys)
    assert code == 2
    assert str(run_dir / "metrics.json") in err and "lacks dataset" in err


def test_missing_inputs_skip_figures_with_a_note(tmp_path):
    runs = tmp_path / "runs"
    write_attack_run(runs / "attack", "none", 0.9)
    write_attack_run(runs / "attack", "noise:0.01", 0.2)
    write_attack_run(runs / "attack", "prune:0.5", 0.6, image_seed=1)  # attacked other images than the rest
    analysis.main(["--runs", str(runs), "--out", str(tmp_path / "static"), "--dpi", "50"])
    report = (tmp_path / "static" / "report.md").read_text()
    assert "--batch-sizes 1 2 4 8" in report  # one batch size: no batch-size figure, and how to get one
    assert "no defense was run at several strengths" in report
    assert not (tmp_path / "static" / "batch_size.png").exists()
    assert (tmp_path / "static" / "ssim_evolution_filtered.png").exists()  # "none" still leaks
    assert "Left out of this grid (they attacked other images): prune:0.5" in report


def test_training_study_alone_gets_its_table_and_trade_off(tmp_path):
    make_runs(tmp_path / "runs", attack=False)
    analysis.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "static"), "--dpi", "50"])
    report = (tmp_path / "static" / "report.md").read_text()
    assert table_row(report, **{MODEL: "DP-SGD (ε=25)"})["Accuracy"] == "0.700"
    assert "](privacy_tradeoff.png)" in report
    assert "run `uv run gradient_attack.py` to make them" in report
