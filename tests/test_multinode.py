"""One run trained across two machines (`torchrun --nnodes 2`), here two node launchers on 127.0.0.1, each with
its own working directory, as machines that share no file system."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import utils

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--models", "cnn", "--privacy", "dp-sgd", "--epsilons", "50", "--epochs", "2", "--accountant", "rdp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(tmp_path: Path, args: list[str]) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node_rank R --master_addr 127.0.0.1 ... train.py args` for R = 0, 1 at once, node R
    in tmp_path/nodeR (relative --out paths land there). Bounded in time: a node that waits for a collective the
    other never joins is killed, and the test fails."""
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = []
    for rank in (0, 1):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir(exist_ok=True)
        launcher = ["-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1"]
        rendezvous = ["--master_addr=127.0.0.1", f"--master_port={port}"]
        cmd = [sys.executable, *launcher, *rendezvous, str(ROOT / "train.py"), *args]
        nodes.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for node in nodes:
        try:
            out, err = node.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            pytest.fail("a node of the job hung: the processes disagreed on what to do")
        done.append(subprocess.CompletedProcess(node.args, node.returncode, out, err))
    return done


def test_two_nodes_write_once_on_the_main_node_and_skip_what_it_finished(tmp_path):
    """Rank 0 (node 0) alone writes the run; node 1's directory stays empty. Run again, node 0 holds the run
    finished and node 1 does not: both skip it, as node 0 decides (parallel.from_main), instead of node 1
    training alone and waiting for ever. A finished run made with other settings stops both nodes alike."""
    first = two_nodes(tmp_path, [*ARGS, "--out", "runs"])
    assert all(p.returncode == 0 for p in first), first[0].stderr[-3000:] + first[1].stderr[-3000:]
    (metrics,) = [utils.read_json(p) for p in (tmp_path / "node0" / "runs").glob("*/metrics.json")]
    assert metrics["processes"] == 2 and 0 < metrics["epsilon"] <= 50
    assert not list((tmp_path / "node1" / "runs").glob("*/*.json"))

    again = two_nodes(tmp_path, [*ARGS, "--out", "runs"])
    assert all(p.returncode == 0 for p in again), again[0].stderr[-3000:] + again[1].stderr[-3000:]
    assert "finished already, skipped" in again[0].stdout
    assert not list((tmp_path / "node1" / "runs").glob("*/*.json"))

    other = two_nodes(tmp_path, [*ARGS, "--max-grad-norm", "2", "--out", "runs"])
    assert [p.returncode for p in other] != [0, 0]
    assert "already finished with other settings" in other[0].stderr
