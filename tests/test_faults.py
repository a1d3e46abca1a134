"""Faults and hostile input, one test per cause: summaries heal from the run directories, damaged runs are redone,
two studies cannot share an output, files respect the umask, and bad input stops with one message (exit 2)."""

from __future__ import annotations

import os
import signal
import stat
import time

import numpy as np
import pytest
from PIL import Image

import analysis
import gradient_attack
import utils

FAST = ["--model", "lenet", "--attacks", "dlg", "--iterations", "2", "--log-every", "1", "--num-images", "2"]


def attack(args: list[str]) -> int:
    try:
        utils.run_cli(lambda: gradient_attack.main(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture
def study(tmp_path):
    """A finished two-run attack study."""
    out = tmp_path / "attack"
    assert attack(["--out", str(out), "--mechanisms", "none", "noise:0.1", *FAST]) == 0
    return out


def test_a_lost_or_damaged_summary_heals_from_the_run_directories(study):
    full = utils.read_csv(study / "summary.csv")
    (study / "summary.csv").unlink()
    assert attack(["--out", str(study), "--mechanisms", "none", *FAST]) == 0  # a study of one run only
    assert utils.read_csv(study / "summary.csv") == full  # ... still lists every finished run
    (study / "summary.csv").write_bytes(b"run,vic\x00\xff\nlenet-dig")  # cut mid-row, binary
    assert attack(["--out", str(study), "--mechanisms", "none", *FAST]) == 0
    assert utils.read_csv(study / "summary.csv") == full
    assert "** on **" not in (study / "summary.md").read_text()


@pytest.mark.parametrize("damage", ["truncated", "garbled", "list", "config deleted"])
def test_a_damaged_finished_run_is_named_and_redone(study, capsys, damage):
    run = study / "lenet-digits-dlg-none-b1-s0"
    metrics = run / "metrics.json"
    if damage == "truncated":
        metrics.write_text(metrics.read_text()[:40])
    elif damage == "garbled":
        metrics.write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "list":
        metrics.write_text("[]")
    else:
        (run / "config.json").unlink()
    capsys.readouterr()
    assert attack(["--out", str(study), "--mechanisms", "none", "noise:0.1", *FAST]) == 0
    assert f"{run} is damaged" in capsys.readouterr().err
    assert utils.run_is_done(run) and len(utils.read_csv(study / "summary.csv")) == 2


def test_a_second_study_on_the_same_output_stops_at_once(study, capsys):
    with utils.study_lock(study):  # the first study still holds it
        assert attack(["--out", str(study), "--mechanisms", "none", *FAST]) == 2
    assert "another study is writing to" in capsys.readouterr().err
    assert attack(["--out", str(study), "--mechanisms", "none", *FAST]) == 0  # free again


def test_results_are_readable_by_the_users_group_as_the_umask_says(tmp_path):
    old = os.umask(0o022)
    try:
        utils.atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
        os.umask(0o077)
        utils.atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_second_ctrl_c_cannot_interrupt_the_report_of_what_was_spent():
    with utils.shielded_from_interrupts():
        os.kill(os.getpid(), signal.SIGINT)  # ignored while the ε line is printed
    with pytest.raises(KeyboardInterrupt):  # and Ctrl-C works again afterwards
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs at once; the sleep only bounds the wait


def test_run_names_are_single_safe_path_components():
    assert utils.safe_name("folder:/data/my set-cnn-none-s0") == "folder_data_my_set-cnn-none-s0"
    assert "/" not in utils.safe_name("../../etc") and utils.safe_name("../../etc") not in ("", ".", "..")


@pytest.fixture
def images(tmp_path):
    grey, colour = tmp_path / "grey.png", tmp_path / "colour.png"
    Image.fromarray(np.full((20, 20), 120, dtype=np.uint8)).save(grey)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(colour)
    return grey, colour


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mechanisms", "prune:"], "ends in ':' with no strength"),
        (["--mechanisms", "quantize:1e6"], "integer number of bits in [1, 32]"),
        (["--indices", "3", "5", "3"], "--indices repeats [3]"),
        (["--images", "DIR"], "is a directory"),
        (["--images", "BOMB"], "too large to read safely"),
        (["--out", "FILE"], "is a file, not a directory"),
        (["--iterations", "2", "--restarts", "0"], "--restarts 0 must be at least 1"),
        (["--success-ssim", "nan"], "--success-ssim nan is not a finite number"),
    ],
)
def test_hostile_input_exits_2_with_one_message(tmp_path, capsys, monkeypatch, images, args, message):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the decompression-bomb guard, at a size a test can make
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    swap = {"DIR": str(tmp_path / "a_dir"), "BOMB": str(images[0]), "FILE": str(tmp_path / "a_file")}
    args = [swap.get(a, a) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "attack")]
    assert attack([*args, *out, "--train-runs", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_your_images_keep_their_colour_and_your_classes(tmp_path, capsys, images):
    """--images without --dataset: the fresh victim takes the files' channels (colour if any is) and
    --num-classes, and the output says what the images were attacked as."""
    out = tmp_path / "attack"
    args = ["--images", *map(str, images), "--labels", "0", "11", "--num-classes", "12", "--image-size", "16"]
    assert attack([*args, "--out", str(out), "--train-runs", str(tmp_path / "none"), "--mechanisms", "none",
                   "--attacks", "idlg", "--iterations", "2"]) == 0  # fmt: skip
    assert "attacked as RGB 16x16 images" in capsys.readouterr().out
    with np.load(out / "lenet-user-images-idlg-none-b1-s0" / "snapshots.npz") as npz:
        assert npz["originals"].shape == (2, 3, 16, 16) and npz["labels"].tolist() == [0, 11]


def _attack_run_with(out, field, value):
    """A finished attack run whose metrics.json holds a wrong-typed value."""
    run = out / "attack" / "bad"
    utils.write_json(run / "config.json", {"run": "bad"})
    metrics = {"run": "bad", "victim": "v", "dataset": "d", "attack": "a", "mechanism": "none",
               "mechanism_name": "none", "strength": None, "epsilon": None, "batch_size": 1, "num_images": 1,
               "loss": 0.1, "mse": 0.1, "psnr": 10.0, "ssim": 0.5, "seed": 0,
               "per_image": [{"image": 0, "mse": 0.1, "psnr": 10.0, "ssim": 0.5, "label_correct": True}]}  # fmt: skip
    if field == "psnr-per-image":
        metrics["per_image"][0]["psnr"] = value
    else:
        metrics[field] = value
    utils.write_json(run / "metrics.json", metrics)


@pytest.mark.parametrize("field", ["ssim", "psnr-per-image", "snapshots"])
def test_analysis_skips_wrong_typed_runs_naming_the_file(tmp_path, capsys, study, field):
    runs = tmp_path / "runs"
    (runs / "attack").mkdir(parents=True)
    os.rename(study / "lenet-digits-dlg-none-b1-s0", runs / "attack" / "good")
    if field == "snapshots":
        np.savez(runs / "attack" / "good" / "snapshots.npz", iterations=np.array(["a"]), snapshots=np.zeros(3),
                 originals=np.zeros((2, 1, 4, 4)))  # fmt: skip
    else:
        _attack_run_with(runs, field, "abc")
    analysis.main(["--runs", str(runs), "--out", str(tmp_path / "report"), "--dpi", "50"])
    err = capsys.readouterr().err
    culprit = "snapshots.npz" if field == "snapshots" else "bad"
    assert culprit in err and "Traceback" not in err


def test_an_analysis_removes_the_figures_its_earlier_report_drew_and_this_one_does_not(tmp_path, study):
    (tmp_path / "runs").mkdir()
    os.rename(study, tmp_path / "runs" / "attack")
    report = tmp_path / "report"
    (report).mkdir()
    (report / "old_figure.png").write_bytes(b"\x89PNG stale")
    (report / "report.md").write_text("![old](old_figure.png)\n")
    (report / "users_own.png").write_bytes(b"\x89PNG mine")  # never drawn by a report: left alone
    analysis.main(["--runs", str(tmp_path / "runs"), "--out", str(report), "--dpi", "50"])
    assert not (report / "old_figure.png").exists() and (report / "users_own.png").exists()


def test_a_run_made_before_a_setting_existed_is_reused_at_its_default_and_redone_otherwise(study, capsys):
    """A run's config.json that lacks a setting (added to the code later) followed its default then."""
    import json

    for run in [d for d in study.iterdir() if d.is_dir()]:
        cfg = utils.read_json(run / "config.json")
        assert cfg.pop("restarts") == 1  # the default, standing in for a setting added after the run
        utils.atomic_write_text(run / "config.json", json.dumps(cfg))
    assert attack(["--out", str(study), "--mechanisms", "none", "noise:0.1", *FAST]) == 0  # reused
    capsys.readouterr()
    assert attack(["--out", str(study), "--mechanisms", "none", "--restarts", "2", *FAST]) == 2
    assert "restarts None -> 2" in capsys.readouterr().err
