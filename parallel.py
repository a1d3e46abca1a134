"""Past one process: torch.distributed for one run trained by several processes (torchrun), and Ray for a
study's independent runs (--workers, --ray-address). Nothing here knows what a run computes.

One run, several processes: `torchrun --nproc_per_node N train.py ...` starts N copies of the study; each
joins the process group torchrun describes in its environment (gloo on CPU, nccl on CUDA, one GPU per
process), trains its share of every batch, and only rank 0 writes files.

Many runs, several workers: `run_tasks` runs a study's independent runs as Ray tasks, on a local Ray started
for the study or on an existing cluster. Each run writes its own directory atomically, as in a serial study,
so the results are the same files; a worker that dies loses only the run it was doing, which is reported
and left unfinished for the next study to redo. Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

import utils

Task = TypeVar("Task")
T = TypeVar("T")


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands in a torchrun job; a plain `python train.py` is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


ONE_PROCESS = ProcessGroup()


def launched_processes() -> int:
    """How many processes torchrun started for this job (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(device_name: str) -> tuple[ProcessGroup, Any]:
    """This process's place in the job and its device. Under torchrun, join the process group from the
    environment it sets (MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK): nccl with one GPU per process on
    CUDA, gloo on CPU."""
    import torch
    import torch.distributed as dist

    device = utils.pick_device(device_name)
    if launched_processes() == 1:
        return ONE_PROCESS, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ProcessGroup(dist.get_rank(), dist.get_world_size()), device


def shows_progress(group: ProcessGroup) -> bool:
    """Whether this process draws per-run progress bars: the main process of a job, and not a Ray worker (whose
    bars would interleave; TQDM_DISABLE, set for the workers, also silences tqdm's own defaults there)."""
    return group.main and os.environ.get("TQDM_DISABLE") != "1"


def leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def from_main(value: T) -> T:
    """The main process's `value` on every process of the job (`value` itself in one process). What only the
    main process can know, such as which runs its output directory holds finished, is decided there: on
    machines that share no file system another node's copy of the directory differs, and a process that
    trained a run the others skip would wait for them for ever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(values: list[float]) -> list[float]:
    """The sums of `values` over the processes of the job (the values themselves in one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


def run_tasks(
    work: Callable[[Any, Task], Any],
    shared: Any,
    tasks: Sequence[Task],
    *,
    workers: int = 1,
    address: str | None = None,
    desc: str = "runs",
    progress: bool = True,
) -> list[Any]:
    """work(shared, task) for every task, results in task order, with a progress bar of runs done / total.

    Serially in this process for workers <= 1 and no address; else as Ray tasks, one CPU each, on a local
    Ray of `workers` CPUs or on the cluster at `address` (`shared` goes to the object store once). A task
    whose worker died (killed, out of memory, its node lost) comes back as the exception that says so rather
    than stopping the others, and is not retried: the next study redoes it. Any other error in a task is
    raised here, as in a serial study."""
    if workers <= 1 and address is None:
        return [work(shared, task) for task in tqdm(tasks, desc=desc, unit="run", disable=not progress)]
    if address is None:  # local workers run this interpreter; Ray would otherwise build a uv env per `uv run`
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray
    from ray.exceptions import NodeDiedError, OutOfMemoryError, RayTaskError, WorkerCrashedError

    env = {"TQDM_DISABLE": "1"}  # per-run bars from workers would interleave; the driver shows runs done / total
    if address is None:
        ray.init(num_cpus=workers, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(address=address, runtime_env={"env_vars": env})
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(work)
        shared_ref = ray.put(shared)
        index = {remote.remote(shared_ref, task): i for i, task in enumerate(tasks)}
        results: list[Any] = [None] * len(tasks)
        pending = list(index)
        with tqdm(total=len(tasks), desc=desc, unit="run") as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    results[index[done[0]]] = ray.get(done[0])
                except (WorkerCrashedError, NodeDiedError, OutOfMemoryError) as err:
                    results[index[done[0]]] = err
                except RayTaskError as err:  # the task's own error, as a serial study would raise it
                    raise err.cause from None
                bar.update()
        return results
    finally:
        ray.shutdown()


def check_workers(workers: int, address: str | None) -> None:
    """--workers and --ray-address, checked before any work."""
    if workers < 1:
        raise utils.UsageError(f"--workers {workers} must be at least 1 (1: one run after another in this process).")
    if address is not None and not address.strip():
        raise utils.UsageError("--ray-address is empty; give the cluster's address (e.g. auto or ray://host:10001).")
