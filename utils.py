"""Plumbing shared by the entry scripts: seeding, device choice, atomic files, summaries, CLI errors. Nothing
heavy at the top (torch loads inside the two functions that need it), so `--help` stays instant."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


class UsageError(Exception):
    """A mistake in what the user asked for: reported as one paragraph and exit code 2, never a traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point, turning UsageError (and Ctrl-C) into a short message instead of a traceback."""
    try:
        main()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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


def upsert_summary(path: Path, row: dict[str, Any], key: str = "run") -> None:
    """Add one run's row to a study summary, replacing an older row of the same run."""
    path = Path(path)
    rows = [r for r in read_csv(path) if r.get(key) != str(row[key])] if path.exists() else []
    rows.append(row)
    write_csv(path, rows)


def run_is_done(run_dir: Path) -> bool:
    """A run is finished once its final metrics exist (they are written last)."""
    return (Path(run_dir) / "metrics.json").exists()


def check_finished_run(run_dir: Path, run_cfg: dict[str, Any], not_result_fields: set[str]) -> None:
    """A finished run is reused only if it was made with the same settings (all but `not_result_fields`,
    which do not change its numbers); otherwise its numbers would silently stand for another experiment."""
    old = read_json(Path(run_dir) / "config.json")
    changed = [k for k, v in run_cfg.items() if k not in not_result_fields and old.get(k) != v]
    if changed:
        diffs = ", ".join(f"{k} {old.get(k)!r} -> {run_cfg[k]!r}" for k in changed)
        raise UsageError(
            f"run {run_dir} already finished with other settings ({diffs}). Pass --force to redo it, or "
            "--out DIR to keep both studies apart."
        )


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
