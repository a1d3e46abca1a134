"""The federation on Flower: Dirichlet shares, FedAvg against centralized training, DP-SGD clients' ε, the
server's view under SecAgg+, the threat-model boundary of the curious server, the deployment engine, and the
CLI's checks. The simulations are tiny (mlp on digits, 3-4 clients); each starts Ray once."""

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import federated
import utils
from attacks import ATTACKS, Attack, Reconstruction
from data_sources import dirichlet_partition, load_dataset
from defenses import SharedUpdate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
TINY = dict(dataset="digits", model="mlp", lr=0.05, batch_size=16, threads=1, client_cpus=1.0)


def tiny(tmp_path: Path, **changes) -> config.FederatedConfig:
    cfg = config.FederatedConfig(out=tmp_path / "federated", **{**TINY, **changes})
    cfg.validate()
    return cfg


# --- partitions ------------------------------------------------------------------------------------------


def test_dirichlet_shares_cover_every_sample_once_with_the_requested_skew():
    labels = load_dataset("digits").y_train
    overall = np.bincount(labels, minlength=10) / len(labels)

    def skew(alpha: float) -> float:  # mean total-variation distance of a client's class mix from the whole's
        parts = dirichlet_partition(labels, 10, alpha, seed=0)
        joined = torch.cat(parts).sort().values
        assert torch.equal(joined, torch.arange(len(labels)))  # every sample exactly once
        mixes = [np.bincount(labels[p], minlength=10) / len(p) for p in parts]
        return float(np.mean([0.5 * np.abs(m - overall).sum() for m in mixes]))

    assert skew(0.1) > 0.6 > skew(0.5) > 0.3 > 0.05 > skew(1000)  # small α: few classes each; large α: IID
    assert [len(p) for p in dirichlet_partition(labels, 5, 0.5, 3)] == [
        len(p) for p in dirichlet_partition(labels, 5, 0.5, 3)
    ]  # seeded


# --- DP-SGD clients --------------------------------------------------------------------------------------------


def test_dp_sgd_clients_report_the_accountants_epsilon_within_their_target(tmp_path):
    from flwr.app import RecordDict

    import federation

    cfg = tiny(tmp_path, privacy="dp-sgd:4", rounds=3, clients=4)
    split, parts = federation.federated_data(cfg)
    arrays = federation.to_arrays(federation.build_model(cfg, split))
    state = RecordDict()
    reported = []
    for server_round in range(1, cfg.rounds + 1):
        arrays, weight, metrics = federation.fit_client(
            cfg, 0, arrays, federation.round_config(cfg, server_round), state
        )
        reported.append(metrics["epsilon"])
        assert weight == len(parts[0]) and metrics["noise-multiplier"] > 0.5
    assert reported == sorted(reported) and 0.8 * 4 < reported[-1] <= 4.0  # spent over R rounds, never above


def test_dp_fedavg_wraps_fedavg_in_flowers_dp_clipping_with_the_accountants_noise(tmp_path):
    import federated_runs
    import federation
    from privacy import epsilon_spent

    cfg = tiny(tmp_path, privacy="dp-fedavg:8", clients=10, fraction=0.5, rounds=20, clipping_norm=0.5)
    recorder = federated_runs.Recorder(cfg)
    strategy = federation.make_strategy(cfg, federation.federated_data(cfg)[0], recorder)
    wrapper = strategy.inner
    assert isinstance(wrapper, federation.DifferentialPrivacyServerSideFixedClipping)
    assert isinstance(wrapper.strategy, federation.FedAvg)
    assert wrapper.num_sampled_clients == 5 and wrapper.clipping_norm == 0.5
    assert wrapper.noise_multiplier == recorder.noise > 0
    spent = [recorder.epsilon(r) for r in (1, 10, 20)]
    assert spent == sorted(spent) and 0.9 * 8 < spent[-1] <= 8.0  # the whole training's ε, at rate 0.5
    assert spent[-1] == epsilon_spent(recorder.noise, 0.5, 20, cfg.delta, "rdp")


# --- simulations: FedAvg, the curious server's boundary, SecAgg+ ------------------------------------------------


class Spy:
    """An attack that keeps whatever the server hands it (and observes one grey image, as attacks do)."""

    def __init__(self):
        self.calls = []

    def run(self, model, update, input_shape, num_classes, cfg, observe, *rest, **kwargs):
        self.calls.append({"args": (model, update, input_shape, num_classes, cfg, observe, *rest), **kwargs})
        images, labels = torch.full((1, *input_shape), 0.5), torch.zeros(1, dtype=torch.long)
        observe(0, images, labels, 0.0)
        return Reconstruction(images, labels, 0.0)


@pytest.fixture
def spy(monkeypatch):
    spy = Spy()
    monkeypatch.setitem(ATTACKS, "spy", Attack(spy.run, 1))
    return spy


def client_update(cfg, sent: list, server_round: int, partition: int) -> list[torch.Tensor]:
    """The client's own update, recomputed here outside Flower: (sent - returned) / lr per parameter."""
    from flwr.app import RecordDict

    import federation

    returned, _, _ = federation.fit_client(
        cfg, partition, sent, federation.round_config(cfg, server_round), RecordDict()
    )
    model = federation.build_model(cfg, federation.federated_data(cfg)[0])
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    return [
        torch.as_tensor(sent[keys.index(n)] - returned[keys.index(n)]).double() / cfg.lr for n in names
    ]  # fmt: skip


def test_fedavg_on_iid_clients_matches_centralized_training_and_the_attack_sees_only_the_update(tmp_path, spy):
    import federated_runs
    import federation

    cfg = tiny(tmp_path, clients=4, alpha=1000.0, rounds=10, attack="spy", attack_rounds=[2])
    federated_runs.run_study(cfg)
    run = cfg.out / federated_runs.run_name(cfg)
    history = utils.read_csv(run / "history.csv")
    assert [int(h["round"]) for h in history] == list(range(cfg.rounds + 1))
    metrics = utils.read_json(run / "metrics.json")

    split, _ = federation.federated_data(cfg)  # centralized: as many epochs of the same SGD on the union
    central = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = federation.build_model(dataclasses.replace(cfg, seed=seed), split)
        for _ in range(cfg.rounds):
            batches = list(torch.randperm(len(split.y_train)).split(cfg.batch_size))
            federation.train_plain(model, split.x_train, split.y_train, batches, cfg.lr)
        central.append(float((model(split.x_test).argmax(1) == split.y_test).float().mean()))
    central = float(np.mean(central))
    assert metrics["accuracy"] > 0.9 and abs(metrics["accuracy"] - central) < 0.04  # measured: 0.938 vs 0.945

    # the attack got the model the server sent and one SharedUpdate: the smallest client's own update, exactly
    (call,) = spy.calls
    sent_model, update = call["args"][:2]
    assert isinstance(update, SharedUpdate) and not call.keys() - {"args"}
    assert all(not isinstance(a, torch.Tensor) for a in call["args"])  # no private batch beside the update
    attack_run = utils.read_json(run / "attacks" / "spy-r2" / "config.json")
    (partition,) = attack_run["clients"]
    sent = federation.to_arrays(sent_model)
    expected = client_update(cfg, sent, 2, partition)
    assert update.num_samples == len(federation.federated_data(cfg)[1][partition])
    assert update.local_steps == math.ceil(update.num_samples / 16) and update.num_clients == 1
    for got, want in zip(update.gradients, expected, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    scored = utils.read_json(run / "attacks" / "spy-r2" / "metrics.json")
    assert len(scored["per_image"]) == update.num_samples and scored["recovered_fraction"] == 0.0

    federated_runs.run_study(cfg)  # finished: skipped
    assert len(spy.calls) == 1


def test_under_secagg_the_server_sees_only_the_sum_of_the_updates(tmp_path, spy, monkeypatch):
    import federated_runs
    import federation

    seen = []
    inner = federation.CuriousServer.aggregate_fit

    def watch(self, server_round, results, failures):
        seen.append([federation.parameters_to_ndarrays(r.parameters) for _, r in results])
        return inner(self, server_round, results, failures)

    monkeypatch.setattr(federation.CuriousServer, "aggregate_fit", watch)
    cfg = tiny(tmp_path, clients=3, privacy="secagg", rounds=1, attack="spy", attack_rounds=[1])
    federated_runs.run_study(cfg)
    (results,) = seen
    for arrays in results[1:]:  # every reply carries the same unmasked mean, none its own weights
        assert all(np.array_equal(a, b) for a, b in zip(arrays, results[0], strict=True))
    (call,) = spy.calls
    sent_model, update = call["args"][:2]
    assert update.num_clients == 3 and update.mechanism == "secagg:3"
    sent = federation.to_arrays(sent_model)
    total = [sum(parts) for parts in zip(*(client_update(cfg, sent, 1, k) for k in range(3)), strict=True)]
    for got, want in zip(update.gradients, total, strict=True):  # SecAgg+ quantizes to 2^22 levels in [-8, 8]
        torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=1e-3)


def test_a_dmgan_client_plays_every_round_and_its_images_are_scored(tmp_path):
    import federated_runs
    import federation

    cfg = tiny(tmp_path, clients=3, rounds=2, attack_rounds=[], dmgan_client=1, dmgan_class=3)
    federated_runs.run_study(cfg)
    run = cfg.out / federated_runs.run_name(cfg)
    rows = utils.read_csv(run / "dmgan.csv")
    assert [int(r["round"]) for r in rows] == [1, 2]  # it took part in both rounds, its generator carried over
    for r in rows:
        assert 0 < float(r["nearest_target_ssim"]) < 1 and 0 <= float(r["held_out_confidence"]) <= 1
    assert utils.read_json(run / "metrics.json")["dmgan"]["round"] == 2
    shape = federation.federated_data(cfg)[0].input_shape
    model = federation.build_model(cfg, federation.federated_data(cfg)[0])
    assert model(torch.zeros(1, *shape)).shape == (1, 11)  # the global model has DMGAN's fake class
    saved = [np.load(run / "dmgan" / f"round-{r}.npz")["images"] for r in (1, 2)]
    assert saved[0].shape == (federation.DMGAN_SHOWN, *shape) and not np.allclose(saved[0], saved[1])


# --- the deployment engine ------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_one_round_on_the_deployment_engine_completes_and_leaves_no_process(tmp_path):
    """A SuperLink and two SuperNodes as processes on 127.0.0.1, the same apps submitted with `flwr run`."""
    bin_dir = Path(sys.executable).parent
    link, node_a, node_b = free_ports(3)
    out = tmp_path / "federated"
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home)}
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    started = []

    def start(*args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{Path(args[0]).name}-{len(started)}.log", "w")
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        return proc

    try:
        start(
            str(bin_dir / "flower-superlink"), "--insecure", "--host=127.0.0.1", f"--port={link}",
            f"--database={tmp_path / 'state.db'}",
        )  # fmt: skip
        for partition, port in enumerate((node_a, node_b)):
            start(
                str(bin_dir / "flower-supernode"), "--insecure", f"--superlink=127.0.0.1:{link}",
                "--host=127.0.0.1", f"--port={port}",
                f"--node-config=partition-id={partition} num-partitions=2",
            )  # fmt: skip
        options = f"--clients 2 --rounds 1 --model mlp --attack-rounds --out {out} --threads 1"
        submit = subprocess.run(
            [str(bin_dir / "flwr"), "run", ".", "test", "--run-config", f'options="{options}"', "--stream"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        runs = list(out.glob("*/metrics.json"))
        logs = "\n".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
        assert runs, f"no finished run:\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}\n{logs}"
        history = utils.read_csv(runs[0].parent / "history.csv")
        assert [int(h["round"]) for h in history] == [0, 1] and int(history[1]["clients"]) == 2
    finally:
        stop(started, home)
    assert not processes_with(home), "processes left behind"


def processes_with(home: Path) -> list[int]:
    """Every process started for the test, whatever its session: they all inherit FLWR_HOME=<home>."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def stop(started: list[subprocess.Popen], home: Path) -> None:
    """SIGTERM to the SuperLink's and SuperNodes' process groups, up to 30 s to exit, then SIGKILL to whatever
    of theirs remains (the apps' subprocesses too)."""
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while processes_with(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in processes_with(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in started:
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while processes_with(home) and time.monotonic() < deadline:  # killed children of exited parents: reaped by init
        time.sleep(0.2)


# --- the command line -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--privacy", "dp-sgd"], "dp-sgd:EPS"),
        (["--privacy", "secagg:3"], "secagg"),
        (["--alpha", "0"], "--alpha 0.0"),
        (["--attack", "nope"], "unknown attack 'nope'"),
        (["--attack-rounds", "99"], "outside the rounds"),
        (["--privacy", "secagg", "--attack", "rtf"], "trap model"),
        (["--privacy", "secagg", "--clients", "2"], "at least 3 clients"),
        (["--fraction", "0"], "--fraction"),
        (["--privacy", "secagg", "--attack", "dlf"], "equal shares"),
        (["--dmgan-client", "10"], "--dmgan-client 10"),
        (["--dmgan-client", "0", "--dmgan-class", "10"], "not a class of digits"),
    ],
)
def test_bad_options_stop_with_one_message_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        utils.run_cli(lambda: federated.main([*args, "--out", str(out)]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_help_answers_before_torch_and_flower_load():
    code = "import sys, federated; sys.argv = ['federated.py', '--help']\ntry:\n federated.main()\nexcept SystemExit: pass\n"
    code += "assert 'torch' not in sys.modules and 'flwr' not in sys.modules, 'heavy import'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, timeout=60)


def test_pyproject_names_the_apps_for_the_deployment_engine():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'serverapp = "federation:server_app"' in text and 'clientapp = "federation:client_app"' in text
    assert shutil.which("flower-superlink", path=str(Path(sys.executable).parent))
    assert dataclasses.is_dataclass(config.FederatedConfig)
