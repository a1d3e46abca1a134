"""The leakage study end to end on tiny settings: the run-directory contract, resuming, the training runs as
victims, --images, the ε -> noise calibration, and bad input (exit 2, one message, nothing written)."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.data import astronaut

import analysis
import config
import figures
import gradient_attack
import leakage
import train
import utils
import victims
from defenses import MechanismSpec
from models import create_model, save_checkpoint
from privacy import release_epsilon
from risk import release_bounds

FAST = ["--iterations", "2", "--log-every", "1", "--num-images", "2", "--inversion-steps", "2"]
RUN_FILES = {"config.json", "metrics.json", "trajectory.csv", "snapshots.npz", "reconstruction.png"}


def run_cli(args):
    """Run the entry point as a user would; returns the exit code (0 when it returns normally)."""
    try:
        utils.run_cli(lambda: gradient_attack.main(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


def test_a_small_study_writes_the_contract_and_resumes(tmp_path, capsys):
    out = tmp_path / "attack"
    args = ["--model", "lenet", "--attacks", "dlg", "--mechanisms", "none", "noise:0.1", "--batch-sizes", "1", "2"]
    args += ["--out", str(out), *FAST]
    assert run_cli(args) == 0
    rows = utils.read_csv(out / "summary.csv")
    assert list(rows[0]) == leakage.SUMMARY_COLUMNS + list(release_bounds({}, 100))
    assert {(r["mechanism"], r["batch_size"]) for r in rows} == {
        ("none", "1"),
        ("none", "2"),
        ("noise:0.1", "1"),
        ("noise:0.1", "2"),
    }
    run = out / "lenet-digits-dlg-noise0.1-b2-s0"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    trajectory = utils.read_csv(run / "trajectory.csv")
    assert len(trajectory) == 2 * 3  # 2 images x iterations 0, 1, 2
    assert {r["batch"] for r in trajectory} == {"0"}
    npz = np.load(run / "snapshots.npz")
    assert npz["snapshots"].shape == (3, 2, 1, 32, 32) and npz["iterations"].tolist() == [0, 1, 2]
    assert npz["originals"].shape == (2, 1, 32, 32) and 0 <= npz["snapshots"].min() <= npz["snapshots"].max() <= 1
    metrics = utils.read_json(run / "metrics.json")
    assert len(metrics["per_image"]) == 2 and metrics["mechanism_name"] == "noise" and metrics["strength"] == 0.1
    assert metrics["epsilon"] is None
    one_at_a_time = out / "lenet-digits-dlg-noise0.1-b1-s0"  # each image is scored against its own original
    last = [r for r in utils.read_csv(one_at_a_time / "trajectory.csv") if r["iteration"] == "2"]
    per_image = utils.read_json(one_at_a_time / "metrics.json")["per_image"]
    assert [float(r["ssim"]) for r in last] == pytest.approx([p["ssim"] for p in per_image])
    assert "| dlg | noise:0.1 |" in capsys.readouterr().out
    assert (out / "summary.md").read_text().count("| dlg |") == 4

    stamp = (run / "metrics.json").stat().st_mtime_ns
    assert run_cli(args) == 0  # a re-run skips finished runs ...
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
    assert len(utils.read_csv(out / "summary.csv")) == 4
    assert run_cli([*args, "--force"]) == 0  # ... unless forced
    assert (run / "metrics.json").stat().st_mtime_ns != stamp
    stamp = (run / "metrics.json").stat().st_mtime_ns
    assert run_cli([*args, "--rtf-bins", "64"]) == 0  # a malicious-server setting does not bear on dlg runs
    assert (run / "metrics.json").stat().st_mtime_ns == stamp
    changed = ["--out", str(out), "--model", "lenet", "--attacks", "dlg", "--mechanisms", "none", "--iterations", "3"]
    assert run_cli(changed) == 2  # a finished run made with other settings is not silently reused
    assert "already finished with other settings" in capsys.readouterr().err


def test_larger_epsilon_means_less_noise():
    training = dataclasses.asdict(config.TrainConfig(accountant="rdp"))  # rdp: the fastest accountant
    victim = victims.Victim("lenet", "lenet", None, "digits", training, None, None, None)
    setups = [leakage.client_setup(victim, MechanismSpec("dp-sgd", eps), 1347, 0) for eps in (8.0, 50.0)]
    (strong, eps8), (weak, eps50) = setups
    assert strong.noise_multiplier > weak.noise_multiplier > 0
    assert eps8.epsilon <= 8.0 and eps8.epsilon == pytest.approx(8.0, rel=0.05) and eps50.epsilon <= 50.0
    # the one attacked release is a Gaussian mechanism, less private than a step of subsampled training ...
    assert eps8.release_epsilon == pytest.approx(release_epsilon(strong.noise_multiplier, 1e-5))
    assert eps8.release_epsilon < eps50.release_epsilon  # ... and more private at a smaller budget


def write_train_run(run_dir, privacy="dp-sgd"):
    """A run directory in train.py's format, with a tiny LeNet on digits."""
    torch.manual_seed(1)
    model = create_model("lenet", (1, 32, 32), 10)
    run_dir.mkdir(parents=True)
    save_checkpoint(model, run_dir / "model.safetensors")
    fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config.TrainConfig()).items()}
    fields.update(dataset="digits", model="lenet", privacy=privacy, target_epsilon=8.0, run=run_dir.name)
    fields.update(max_grad_norm=0.5, lr=0.05, reg_sigma=1.0, batch_size=32, epochs=30, delta=1e-5, accountant="prv")
    utils.write_json(run_dir / "config.json", fields)
    utils.write_json(run_dir / "metrics.json", {"run": run_dir.name, "noise_multiplier": 1.3, "epsilon": 7.9})
    return model


def test_from_run_uses_the_trained_model_and_its_dp_setup(tmp_path):
    run_dir = tmp_path / "train" / "digits-lenet-dp-sgd-eps8"
    trained = write_train_run(run_dir)
    cfg = config.parse(config.AttackConfig, ["--from-run", str(run_dir)])
    victim, split = victims.trained_victim(cfg, run_dir)
    for a, b in zip(victim.model.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    setup, privacy = leakage.client_setup(victim, MechanismSpec("dp-sgd", None), len(split.x_train), 0)
    assert (setup.noise_multiplier, setup.max_grad_norm, privacy.epsilon) == (1.3, 0.5, 7.9)

    out = tmp_path / "attack"
    run = ["--from-run", str(tmp_path / "train" / "*"), "--out", str(out)]  # a glob, as a shell would pass it
    assert run_cli([*run, "--attacks", "idlg", *FAST]) == 0  # its own mechanism: dp-sgd with its own noise
    row = utils.read_csv(out / "summary.csv")[0]
    assert (
        row["victim"] == "digits-lenet-dp-sgd-eps8" and row["mechanism"] == "dp-sgd:8" and float(row["epsilon"]) == 7.9
    )
    assert float(row["release_epsilon"]) == pytest.approx(release_epsilon(1.3, 1e-5))  # the one release attacked
    assert row["model"] == "lenet" and float(row["noise_multiplier"]) == 1.3 and float(row["max_grad_norm"]) == 0.5


def test_with_no_training_run_the_study_says_so_and_attacks_the_demonstration(tmp_path, capsys):
    out = tmp_path / "attack"
    args = ["--train-runs", str(tmp_path / "nothing"), "--out", str(out), "--attacks", "idlg", "--mechanisms", "none"]
    assert run_cli([*args, *FAST]) == 0
    assert "no finished training run" in capsys.readouterr().out
    assert (out / "lenet-digits-idlg-none-b1-s0" / "metrics.json").exists()


def test_a_users_colour_photo_is_recovered_from_the_undefended_update(tmp_path):
    """The user's own file, resized to the model input (colour LeNet at 16x16 to keep the test short),
    comes back from the plain gradient: image and label."""
    photo = tmp_path / "astronaut.png"
    Image.fromarray(astronaut()).resize((64, 64)).save(photo)
    out = tmp_path / "attack"
    args = ["--dataset", "photos", "--image-size", "16", "--images", str(photo), "--labels", "3"]
    assert run_cli([*args, "--mechanisms", "none", "--attacks", "idlg", "--out", str(out)]) == 0
    metrics = utils.read_json(out / "lenet-user-images-idlg-none-b1-s0" / "metrics.json")
    npz = np.load(out / "lenet-user-images-idlg-none-b1-s0" / "snapshots.npz")
    assert npz["originals"].shape == (1, 3, 16, 16) and npz["labels"].tolist() == [3]
    assert metrics["label_accuracy"] == 1.0  # iDLG reads the label off the gradient exactly
    assert metrics["psnr"] > 30 and metrics["ssim"] > 0.95


@pytest.fixture
def not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attacks", "dlgx"], "unknown attack 'dlgx'"),
        (["--mechanisms", "blur"], "unknown mechanism 'blur'"),
        (["--mechanisms", "prune:1.5"], "strength 1.5 in 'prune:1.5' is out of range"),
        (["--mechanisms", "quantize:0"], "integer number of bits"),
        (["--mechanisms", "dp-sgd:0"], "ε in (0, 100]"),
        (["--mechanisms", "dp-sgd"], "reuses a DP-SGD training run's noise"),
        (["--images", "missing.png"], "does not exist"),
        (["--images", "NOT_AN_IMAGE"], "is not an image"),
        (["--batch-sizes", "5000"], "training set has 1347"),
        (["--mechanisms", "secagg:2000"], "needs 1999 other clients' images"),
        (["--from-run", "NOT_A_RUN"], "is not a finished train.py run"),
        (["--dataset", "nope"], "unknown dataset 'nope'"),
        (["--rtf-bins", "8", "--rtf-measurements", "5"], "--rtf-measurements 5 must lie in [0, 4]"),
        (["--from-run", "NOT_A_RUN", "--model", "cnn"], "Give one or the other"),
        (["--from-run", "NOT_A_RUN/*"], "matches no finished train.py run"),
        (["--attacks", "giavmp", "--model", "lenet"], "first one is its classifier"),
    ],
)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tmp_path, capsys, not_an_image, args, message):
    (tmp_path / "empty_dir").mkdir()
    args = [
        a.replace("NOT_AN_IMAGE", str(not_an_image)).replace("NOT_A_RUN", str(tmp_path / "empty_dir")) for a in args
    ]
    out = tmp_path / "attack"
    assert run_cli([*args, "--out", str(out), "--train-runs", str(tmp_path / "no-runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_the_servers_auxiliary_data_holds_neither_the_victims_images_nor_the_clients_test_split():
    cfg = config.parse(config.AttackConfig, ["--num-images", "8"])
    split = victims.load_data(cfg, "digits", dataclasses.asdict(config.TrainConfig()))
    data = leakage.private_data(cfg, split, 8)
    aux = leakage.aux_data(split, data.exclude)
    assert len(data.exclude) == 8 and len(aux.x_test) == 0 and len(split.x_test) > 0
    others = [i for i in range(len(split.x_train)) if i not in data.exclude]
    assert torch.equal(aux.x_train, split.x_train[others])


def test_the_default_chain_attacks_every_training_run_under_its_own_privacy(tmp_path, monkeypatch):
    """uv run train.py && uv run gradient_attack.py && uv run analysis.py, on a tiny training study: every run
    is attacked under what it shares, auto picks by the server's own measure, and the trade-off figure has
    accuracy and leakage for the model, with no empty panel."""
    train.main(["--out", str(tmp_path / "train"), "--epochs", "1", "--epsilons", "8", "--accountant", "rdp"])
    assert run_cli(["--train-runs", str(tmp_path / "train"), "--out", str(tmp_path / "attack"), *FAST]) == 0
    rows = utils.read_csv(tmp_path / "attack" / "summary.csv")
    shared = {(r["victim"], r["mechanism"]) for r in rows}
    assert shared == {
        *(("faces-cnn-none-s0", m) for m in ["none", *config.DEFAULT_DEFENSES]),
        ("faces-cnn-dp-sgd-eps8-s0", "dp-sgd:8"),
        ("faces-cnn-regularized-s0", "regularized"),
    }
    assert {r["attack"] for r in rows} == {"auto", "fc-readout", "ig"}  # a ReLU cnn: no L-BFGS attack
    assert all(r["model"] == "cnn" for r in rows)

    trained = utils.read_json(tmp_path / "train" / "faces-cnn-dp-sgd-eps8-s0" / "metrics.json")
    dp = next(r for r in rows if r["mechanism"] == "dp-sgd:8" and r["attack"] == "auto")
    assert float(dp["noise_multiplier"]) == pytest.approx(trained["noise_multiplier"])  # the run's own noise
    assert float(dp["epsilon"]) == pytest.approx(trained["epsilon"], rel=1e-3)  # ... and its whole-run ε
    assert float(dp["release_epsilon"]) == pytest.approx(release_epsilon(trained["noise_multiplier"], 1e-5))

    for row in (r for r in rows if r["attack"] == "auto"):
        metrics = utils.read_json(tmp_path / "attack" / row["run"] / "metrics.json")
        for batch in metrics["chosen"]:  # the candidate that explains the shared update best, by its own measure
            assert batch["attack"] == min(batch["matching"], key=batch["matching"].get)

    empty_panels = []
    monkeypatch.setattr(figures, "_empty", lambda ax, message: empty_panels.append(message))
    analysis.main(["--runs", str(tmp_path), "--out", str(tmp_path / "static"), "--dpi", "50"])
    assert (tmp_path / "static" / "privacy_tradeoff.png").exists() and empty_panels == []
