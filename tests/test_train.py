"""The training study end to end on the embedded faces set (tiny epochs), and its parts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import config
import train
import training
import utils
from data_sources import load_dataset
from models import FrozenBackbone, create_model, load_checkpoint, save_checkpoint
from privacy import epsilon_spent, noise_multiplier_for
from risk import run_bounds

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus advice and hook notes, not findings
FAST = ["--epochs", "2", "--accountant", "rdp"]  # rdp finds the noise multiplier ~3x faster than prv


def run_main(args: list[str]) -> None:
    """train.main as the command line runs it: a UsageError becomes exit code 2."""
    utils.run_cli(lambda: train.main(args))


def test_study_writes_the_contract_and_dp_spends_at_most_its_target(tmp_path, capsys):
    run_main(["--out", str(tmp_path), "--epsilons", "8", *FAST])
    names = ["faces-cnn-none-s0", "faces-cnn-dp-sgd-eps8-s0", "faces-cnn-regularized-s0"]
    rows = {r["run"]: r for r in utils.read_csv(tmp_path / "summary.csv")}
    assert sorted(rows) == sorted(names)
    assert list(next(iter(rows.values()))) == training.SUMMARY_COLUMNS + list(run_bounds({}, 100))
    for name in names:
        run_dir = tmp_path / name
        cfg = json.loads((run_dir / "config.json").read_text())
        assert cfg["run"] == name and cfg["privacy"] == name.split("faces-cnn-")[1].split("-eps")[0].removesuffix("-s0")
        history = utils.read_csv(run_dir / "history.csv")
        assert [int(h["epoch"]) for h in history] == [1, 2]
        metrics = utils.read_json(run_dir / "metrics.json")
        assert metrics["steps"] > 0 and 0 <= metrics["accuracy"] <= 1
        assert (run_dir / "model.safetensors").stat().st_size > 0

    dp = rows["faces-cnn-dp-sgd-eps8-s0"]
    assert 0.9 * 8 <= float(dp["epsilon"]) <= 8.0  # the accountant's ε after the planned steps
    assert float(dp["noise_multiplier"]) > 0 and float(dp["sample_rate"]) == pytest.approx(0.2)
    eps_history = [float(h["epsilon"]) for h in utils.read_csv(tmp_path / "faces-cnn-dp-sgd-eps8-s0" / "history.csv")]
    assert eps_history[0] < eps_history[1] == pytest.approx(float(dp["epsilon"]))
    for name in ("faces-cnn-none-s0", "faces-cnn-regularized-s0"):  # no formal ε: empty, never invented
        assert rows[name]["epsilon"] == rows[name]["target_epsilon"] == rows[name]["noise_multiplier"] == ""

    table = (tmp_path / "summary.md").read_text()
    assert table in capsys.readouterr().out  # printed as written
    lines = table.splitlines()
    assert lines[0].split(" | ")[-2:] == ["ε spent", "Reconstruction ≤ (1 of 10) |"]  # one seed: no Seeds column
    assert lines[2] == "| **Convolutional Neural Network (custom CNN) on faces** " + "|" * 10
    cells = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ") for line in lines[3:]}
    assert list(cells) == ["Traditional Training", "DP-SGD (ε=8)", "Explicit Regularization"]
    assert cells["DP-SGD (ε=8)"][-2] == f"{float(dp['epsilon']):.3f}"  # the accountant's ε, not the target
    assert cells["DP-SGD (ε=8)"][-1] == f"{float(dp['reconstruction_bound']):.3f}"
    assert cells["Traditional Training"][-2:] == ["∞", "--"] and cells["Explicit Regularization"][-2:] == ["--", "--"]
    for label, name in [("Traditional Training", "faces-cnn-none-s0"), ("DP-SGD (ε=8)", "faces-cnn-dp-sgd-eps8-s0")]:
        assert cells[label][2] == f"{float(rows[name]['accuracy']):.3f}"


def test_interrupted_study_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
    args = ["--out", str(tmp_path), "--privacy", "none", "regularized", "--epochs", "1"]
    real_fit, calls = training.fit, []

    def interrupted_fit(cfg, run, *rest):
        calls.append(run.name)
        if run.privacy == "regularized" and len(calls) == 2:
            raise KeyboardInterrupt
        return real_fit(cfg, run, *rest)

    monkeypatch.setattr(training, "fit", interrupted_fit)
    with pytest.raises(SystemExit) as exit_info:
        run_main(args)
    assert exit_info.value.code == 130
    assert utils.run_is_done(tmp_path / "faces-cnn-none-s0")
    assert not utils.run_is_done(tmp_path / "faces-cnn-regularized-s0")
    first_mtime = (tmp_path / "faces-cnn-none-s0" / "metrics.json").stat().st_mtime_ns

    run_main(args)  # resumes: only the unfinished run trains
    assert calls == ["faces-cnn-none-s0", "faces-cnn-regularized-s0", "faces-cnn-regularized-s0"]
    assert (tmp_path / "faces-cnn-none-s0" / "metrics.json").stat().st_mtime_ns == first_mtime
    assert len(utils.read_csv(tmp_path / "summary.csv")) == 2

    run_main([*args, "--force"])  # --force redoes both
    assert calls[3:] == ["faces-cnn-none-s0", "faces-cnn-regularized-s0"]

    with pytest.raises(SystemExit):  # a finished run made with other settings is not silently reused
        run_main(["--out", str(tmp_path), "--privacy", "none", "--epochs", "2"])


def test_dp_run_stopped_early_reports_the_epsilon_of_the_steps_taken(tmp_path, capsys):
    cfg = config.TrainConfig(epochs=4, accountant="gdp", out=tmp_path)
    data, calls = load_dataset("faces"), []

    def stop_at_third_step(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return x

    planned_steps = cfg.epochs * 5  # sample rate 32/150 -> 1/5: five expected batches per epoch
    sigma = noise_multiplier_for(8.0, cfg.delta, 0.2, planned_steps, "gdp")
    run = training.Run("stopped", "cnn", "dp-sgd", 8.0, sigma)
    model = create_model("cnn", data.input_shape, 2)
    with pytest.raises(KeyboardInterrupt):
        training.fit(cfg, run, model, stop_at_third_step, data, torch.device("cpu"), tmp_path / "h.csv")
    spent = epsilon_spent(sigma, 0.2, 2, cfg.delta, "gdp")
    assert spent < 8.0 / 2
    assert f"stopped after 2 steps: ε spent so far = {spent:.3f}" in capsys.readouterr().out


def test_same_seed_same_numbers(tmp_path):
    for out in ("a", "b"):
        run_main(["--out", str(tmp_path / out), "--privacy", "none", "--epochs", "2"])
    a, b = (utils.read_json(tmp_path / out / "faces-cnn-none-s0" / "metrics.json") for out in ("a", "b"))
    assert a["accuracy"] == b["accuracy"] and a["mcc"] == b["mcc"]
    history = [utils.read_csv(tmp_path / out / "faces-cnn-none-s0" / "history.csv") for out in ("a", "b")]
    assert history[0] == history[1]


def test_plain_cnn_learns_faces_and_dp_with_a_huge_budget_comes_close(tmp_path):
    """A sanity bound on the whole loop: far above chance (0.5), and DP-SGD whose noise is negligible
    (ε = 1e6) loses little; the gap left is clipping and Poisson sampling."""
    run_main(["--out", str(tmp_path), "--privacy", "none", "dp-sgd", "--epsilons", "1e6", "--accountant", "rdp"])
    rows = {r["privacy"]: r for r in utils.read_csv(tmp_path / "summary.csv")}
    plain, dp = float(rows["none"]["accuracy"]), float(rows["dp-sgd"]["accuracy"])
    assert plain >= 0.85
    assert dp >= plain - 0.1
    assert float(rows["dp-sgd"]["noise_multiplier"]) < 0.1


def _tiny_backbone_model() -> FrozenBackbone:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    return FrozenBackbone(backbone, 32, 2, image_size=16)


@pytest.mark.parametrize("privacy", ["none", "dp-sgd", "regularized"])
def test_feature_cache_trains_the_same_head_as_the_naive_loop(tmp_path, privacy):
    data = load_dataset("faces")
    heads = []
    for cache in (True, False):
        cfg = config.TrainConfig(epochs=2, feature_cache=cache, accountant="gdp", out=tmp_path)
        template = _tiny_backbone_model()
        split, prepare, _ = training.head_inputs(cfg, template, data, torch.device("cpu"))
        assert (split.x_train.dim() == 2) == cache  # features (N, 32) or the images themselves
        model = training.fresh_model(template)
        assert model.backbone is template.backbone  # shared, never copied
        z = noise_multiplier_for(8.0, 1e-5, 0.2, 10, "gdp") if privacy == "dp-sgd" else None
        run = training.Run("r", "tiny", privacy, 8.0 if privacy == "dp-sgd" else None, z)
        metrics = training.fit(cfg, run, model.head, prepare, split, torch.device("cpu"), tmp_path / f"h{cache}.csv")
        heads.append((model.head.weight.detach().clone(), metrics["accuracy"]))
    torch.testing.assert_close(heads[0][0], heads[1][0], atol=1e-5, rtol=1e-4)
    assert heads[0][1] == heads[1][1]


def test_checkpoint_reloads_into_an_equal_model(tmp_path):
    model = create_model("cnn", (1, 25, 25), 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # not the initial weights a fresh model would have anyway
    save_checkpoint(model, tmp_path / "m.safetensors")
    fresh = load_checkpoint(create_model("cnn", (1, 25, 25), 2), tmp_path / "m.safetensors")
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    x = torch.rand(3, 1, 25, 25)
    assert torch.equal(model.eval()(x), fresh.eval()(x))

    frozen = _tiny_backbone_model()
    save_checkpoint(frozen, tmp_path / "f.safetensors")
    other = _tiny_backbone_model()
    nn.init.zeros_(other.head.weight)
    load_checkpoint(other, tmp_path / "f.safetensors")
    assert torch.equal(other.head.weight, frozen.head.weight)
    with pytest.raises(utils.UsageError):
        load_checkpoint(create_model("mlp", (4,), 2), tmp_path / "m.safetensors")


BAD_INPUTS = [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--models", "nope"], "unknown model 'nope'"),
    (["--privacy", "nope"], "unknown privacy mode 'nope'"),
    (["--epsilons", "0"], "epsilon 0.0 is not positive"),
    (["--epsilons", "-8"], "epsilon -8.0 is not positive"),
    (["--delta", "0.5"], "--delta 0.5 must lie in (0, 1/N)"),
    (["--delta", "0"], "--delta 0.0 must lie in (0, 1/N)"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the 150 training samples"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0 must be positive"),
    (["--epochs", "0"], "--epochs 0 must lie in [1, 10000]"),
    (["--epochs", "100000000"], "--epochs 100000000 must lie in [1, 10000]"),
    (["--seed", "-1"], "--seed -1 must lie in [0, 2^32)"),
    (["--device", "foo"], "--device 'foo' is unknown"),
    (["--lr", "inf"], "--lr inf is not a finite number"),
    (["--reg-sigma", "nan"], "--reg-sigma nan is not a finite number"),
    (["--max-grad-norm", "inf"], "--max-grad-norm inf is not a finite number"),
    (["--epsilons", "8", "inf", "--accountant", "rdp"], "--epsilons inf is not a finite number"),
    (["--accountant", "moments"], "unknown accountant 'moments'"),
    (["--threads", "-1"], "--threads -1 must be >= 0"),
    (["--dataset", "breast-cancer", "--models", "cnn"], "model 'cnn' needs images"),
    (["--dataset", "photos"], "has no test split"),
    (["--models", "resnet50"], "'resnet50'"),  # pretrained weights offline (HF_HUB_OFFLINE in conftest)
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_its_message(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--out", str(tmp_path), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "summary.csv").exists()  # nothing trained


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--epochs", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--epochs 0 must lie in [1, 10000]" in proc.stderr and "Traceback" not in proc.stderr


def test_a_budget_no_noise_reaches_stops_the_study_before_any_run_trains(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--out", str(tmp_path / "out"), "--epsilons", "8", "0.001", "--accountant", "rdp"])
    assert exit_info.value.code == 2 and "no noise multiplier reaches ε = 0.001" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # not even the plain run trained first


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_output_that_cannot_be_a_directory_is_refused_before_any_work(tmp_path, capsys, where):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    out = blocker if where == "file" else blocker / "train"
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--out", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(out) in err and "Traceback" not in err


def test_a_diverging_run_is_recorded_as_failed_not_finished(tmp_path, capsys):
    """A finite but far too large learning rate drives the loss to NaN: the run writes failed.json, never
    metrics.json, so no later study reuses it, and the command says which run failed and what to change."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--out", str(tmp_path), "--privacy", "none", "--epochs", "3", "--lr", "1e12"])
    assert exit_info.value.code == 2 and "--lr" in capsys.readouterr().err
    run = tmp_path / "faces-cnn-none-s0"
    assert (run / "failed.json").exists() and not utils.run_is_done(run)
    assert utils.read_csv(tmp_path / "summary.csv") == []


def test_runs_of_other_seeds_and_random_weights_get_their_own_names():
    cfg = config.TrainConfig(models=["cnn", "resnet50"], privacy=["none"], seed=3, pretrained=False)
    assert [r.name for r in training.study_runs(cfg, "folder:/data/x", 100)] == [
        "folder_data_x-cnn-none-s3",
        "folder_data_x-resnet50-random-none-s3",
    ]


def test_the_entry_points_answer_help_before_torch_loads():
    """`--help` and a bad option answer at once: the command lines load no PyTorch (the studies import it)."""
    code = "import sys, train, gradient_attack, config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
    proc = subprocess.run([sys.executable, str(ROOT / "gradient_attack.py"), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and "--attacks" in proc.stdout
