"""Plumbing shared by the entry scripts: seeding, device choice, atomic files, summaries, CLI errors. Nothing
heavy at the top (torch loads inside the two functions that need it), so `--help` stays instant."""

from __future__ import annotations

import csv
import dataclasses
import errno
import fcntl
import io
import json
import os
import random
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one paragraph and exit code 2, never a traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point, turning UsageError (and Ctrl-C) into a short message instead of a traceback. A full
    disk is a UsageError too: the files written so far are whole (atomic writes), the run in progress is not
    marked finished, and the same command resumes once there is space."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({err.filename or 'writing results'}): finished runs are kept whole; free "
              "some space and re-run the same command to resume.", file=sys.stderr)  # fmt: skip
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished runs are kept; re-run the same command to resume.", file=sys.stderr)
        sys.exit(130)


def seed_everything(seed: int) -> None:
    """Same seed, same numbers on the same machine: on a GPU too, where cuDNN and cuBLAS would otherwise pick
    fast kernels whose sums run in varying order."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU; never assume a GPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} was asked for but no CUDA device is available; use --device cpu or auto.")
    return torch.device(name)


def _file_mode() -> int:
    """The mode an ordinary new file gets under the user's umask (mkstemp's own 0600 would hide results from
    the user's group)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if hasattr(obj, "tolist"):  # a torch tensor
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomically write dict rows; the columns are the union of the keys, in first-seen order."""
    rows = list(rows)
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


_REPORTED: set[Path] = set()  # damaged runs already reported, so each is named once


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's metrics: its metrics.json (written last) and config.json, both whole JSON objects.
    A damaged run (a truncated, garbled or deleted file) is named once on stderr and counts as unfinished,
    so the study redoes it instead of stopping or trusting it."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        return None
    try:
        metrics, config = read_json(run_dir / "metrics.json"), read_json(run_dir / "config.json")
        if not isinstance(metrics, dict) or not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if run_dir not in _REPORTED:
            _REPORTED.add(run_dir)
            print(f"note: {run_dir} is damaged ({type(err).__name__}: {err}); it is redone.", file=sys.stderr)
        return None
    return metrics


def run_is_done(run_dir: Path) -> bool:
    """A run is finished once its final metrics exist (they are written last) and are whole."""
    return finished_metrics(run_dir) is not None


def write_summary(
    out: Path,
    columns: list[str],
    table: Callable[[list[dict[str, Any]]], str],
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[dict]:
    """summary.csv (one row per finished run, `columns` of its metrics.json, plus the columns `derive` computes
    from them) and summary.md (`table` of the same rows), rebuilt from the run directories, the source of
    truth: a lost or damaged summary heals here."""
    rows = []
    for run_dir in sorted(Path(out).iterdir()) if Path(out).is_dir() else []:
        metrics = finished_metrics(run_dir) if run_dir.is_dir() else None
        if metrics is not None:
            row = {k: metrics.get(k) for k in columns}
            rows.append({**row, **derive(row)} if derive else row)
    write_csv(Path(out) / "summary.csv", rows)
    atomic_write_text(Path(out) / "summary.md", table(rows))
    return rows


def config_defaults(config_class: type) -> dict[str, Any]:
    """Each field's default as a run's config.json holds it (paths as strings)."""
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        defaults[f.name] = str(value) if isinstance(value, Path) else value
    return defaults


def check_finished_run(
    run_dir: Path, run_cfg: dict[str, Any], not_result_fields: set[str], defaults: dict[str, Any] | None = None
) -> None:
    """A finished run is reused only if it was made with the same settings (all but `not_result_fields`,
    which do not change its numbers); otherwise its numbers would silently stand for another experiment.
    A setting its config.json lacks was added after the run was made, which then followed the setting's
    default (`defaults`): only another value counts as a change."""
    old = read_json(Path(run_dir) / "config.json")
    defaults = defaults or {}

    def differs(key: str, value: Any) -> bool:
        if key in old:
            return old[key] != value
        return key not in defaults or defaults[key] != value

    changed = [k for k, v in run_cfg.items() if k not in not_result_fields and differs(k, v)]
    if changed:
        diffs = ", ".join(f"{k} {old.get(k)!r} -> {run_cfg[k]!r}" for k in changed)
        raise UsageError(
            f"run {run_dir} already finished with other settings ({diffs}). Pass --force to redo it, or "
            "--out DIR to keep both studies apart."
        )


def check_output(path: Path, option: str = "--out") -> None:
    """Before any work: `path` must be, or be creatable as, a directory the user can write to. Nothing is
    created here (a command stopped by bad input leaves no trace)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a directory; give a directory (it is created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(
            f"{option} {path}: {existing} is a file, so no directory can be made there; give another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable for you; give a directory you can write to.")


@contextmanager
def study_lock(out: Path) -> Iterator[None]:
    """Hold `out`/.lock for the whole study: a second study on the same directory stops at once, instead of
    duplicating every run and racing on the summary. The lock dies with the process (fcntl)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another study is writing to {out} (it holds {Path(out) / '.lock'}); wait for it to finish, or give "
                "this one another --out."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def shielded_from_interrupts() -> Iterator[None]:
    """Ignore Ctrl-C for a moment (reporting what an interrupted run spent), so a second one does not lose it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def safe_name(text: str) -> str:
    """One filesystem-safe path component: a dataset such as folder:/data/x must not make nested run names."""
    return re.sub(r"[^A-Za-z0-9.+=-]+", "_", text).strip("_.") or "_"


def format_number(value: Any, digits: int = 3) -> str:
    """Numbers for Markdown tables: fixed digits for floats, '--' for missing."""
    if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
        return "--"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_measured_tables(tables: dict[int, tuple[str, Callable, list[str]]], numbers: Iterable[int], cfg: Any) -> None:
    """A benchmark script's output: for each chosen number, `measure(scratch_dir, cfg)` into a titled Markdown
    table, printed as soon as it is measured (a scratch directory, removed afterwards, holds the runs)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for number in numbers:
            title, measure, header = tables[number]
            rows = measure(Path(tmp), cfg)
            print(f"\n### {number}. {title}\n\n{markdown_table(header, rows)}", flush=True)
