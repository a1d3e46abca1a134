"""The models under attack: the finished training runs (their weights, data split and privacy set-up, as
train.py left them), a freshly built architecture (--model/--dataset), or the user's own images; with no
training run, the LeNet demonstration. The leakage study (leakage.py) attacks each of them."""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import config
import utils
from data_sources import DataOptions, DataSplit, image_channels, load_dataset, load_image_files
from models import FrozenBackbone, create_model, load_checkpoint

TRAIN_RUN_FILES = ("config.json", "metrics.json", "model.safetensors")


@dataclass
class Victim:
    """The client's model and training set-up: a fresh architecture, or a train.py run."""

    name: str  # the architecture, or the train.py run's directory name
    architecture: str
    model: nn.Module
    dataset: str
    training: dict[str, Any]  # TrainConfig fields the client trained (or would train) with, and its target ε
    privacy: str | None  # the training run's privacy mode; None for a fresh model
    noise_multiplier: float | None  # a DP run's own z, for `dp-sgd` without an ε
    epsilon: float | None  # ... and the ε its whole training spent


def training_runs(cfg: config.AttackConfig) -> list[Path]:
    """The training runs to attack: --from-run's directories and globs, or every finished run under
    --train-runs. A directory named explicitly must be a finished run; a glob skips what is not one."""
    if not cfg.from_run:
        found = sorted(cfg.train_runs.glob("*")) if cfg.train_runs.is_dir() else []
        return [d for d in found if _is_training_run(d)]
    runs: list[Path] = []
    for pattern in cfg.from_run:
        if glob.has_magic(pattern):
            runs += [Path(p) for p in sorted(glob.glob(pattern)) if _is_training_run(Path(p))]
            continue
        missing = [f for f in TRAIN_RUN_FILES if not (Path(pattern) / f).is_file()]
        if missing or not utils.run_is_done(Path(pattern)):
            lack = f"it lacks {', '.join(missing)}" if missing else "its config.json or metrics.json is damaged"
            raise utils.UsageError(
                f"--from-run {pattern} is not a finished train.py run: {lack}. Give a directory such as "
                "runs/train/faces-cnn-none-s0 written by `uv run train.py`, or a glob (runs/train/*)."
            )
        runs.append(Path(pattern))
    if not runs:
        raise utils.UsageError(f"--from-run {' '.join(cfg.from_run)} matches no finished train.py run.")
    return list(dict.fromkeys(runs))


def _is_training_run(path: Path) -> bool:
    """A finished train.py run whose record is whole (a damaged one is named on stderr and left out)."""
    return path.is_dir() and all((path / f).is_file() for f in TRAIN_RUN_FILES) and utils.run_is_done(path)


def load_data(cfg: config.AttackConfig, name: str, training: dict[str, Any]) -> DataSplit:
    """The dataset split as `training` (TrainConfig fields) makes it, so a run's training images are found."""
    opts = DataOptions(cfg.data_root, cfg.download, training["seed"], training["test_fraction"], training["image_size"])
    return load_dataset(name, opts)


def fresh_victim(cfg: config.AttackConfig) -> tuple[Victim, DataSplit]:
    """A freshly initialised model (--model, default the DLG LeNet) on --dataset (default digits), or, for
    --images without a --dataset, on the files themselves: their channels (grey if every file is), --image-size
    and --num-classes."""
    model_name = cfg.model or config.DEMO_MODEL
    training = dataclasses.asdict(config.TrainConfig()) | {"seed": cfg.seed, "image_size": cfg.image_size}
    if cfg.images and cfg.dataset is None:
        split, dataset = user_images_split(cfg), "user-images"
    else:
        dataset = cfg.dataset or config.DEMO_DATASET
        split = load_data(cfg, dataset, training)
    torch.manual_seed(cfg.seed)
    model = create_model(model_name, split.input_shape, split.num_classes, pretrained=cfg.pretrained)
    training["pretrained"] = cfg.pretrained
    return Victim(model_name, model_name, model, dataset, training, None, None, None), split


def user_images_split(cfg: config.AttackConfig) -> DataSplit:
    """The user's files as a dataset of their own (nothing besides them: no other clients, no auxiliary data)."""
    shape = (image_channels(cfg.images), cfg.image_size, cfg.image_size)
    images = load_image_files(cfg.images, shape)
    labels = torch.tensor(cfg.labels or [0] * len(images))
    classes = [str(c) for c in range(cfg.num_classes)]
    return DataSplit("user-images", images, labels, images[:0], labels[:0], classes)


def trained_victim(cfg: config.AttackConfig, run_dir: Path) -> tuple[Victim, DataSplit]:
    """A train.py run: its weights (a frozen backbone rebuilt as it was trained, pretrained or not), its data
    split and its privacy set-up."""
    run_cfg, run_metrics = utils.read_json(run_dir / "config.json"), utils.read_json(run_dir / "metrics.json")
    if "model" not in run_cfg or "dataset" not in run_cfg:
        raise utils.UsageError(f"{run_dir}: config.json names no model or dataset; was it written by train.py?")
    training = dataclasses.asdict(config.TrainConfig())
    training.update({k: v for k, v in run_cfg.items() if k in training})
    training["target_epsilon"] = run_cfg.get("target_epsilon")  # a DP-SGD run's budget
    split = load_data(cfg, run_cfg["dataset"], training)  # the run's own split: its seed, test share and size
    model = create_model(run_cfg["model"], split.input_shape, split.num_classes, pretrained=training["pretrained"])
    if isinstance(model, FrozenBackbone) and training.get("finetune") == "full":
        model.unfreeze()  # fine-tuned end to end: GroupNorms in place of BatchNorms, its backbone in the checkpoint
    load_checkpoint(model, run_dir / "model.safetensors")
    privacy = run_cfg.get("privacy")
    z, eps = (run_metrics.get("noise_multiplier"), run_metrics.get("epsilon")) if privacy == "dp-sgd" else (None, None)
    return Victim(run_dir.name, run_cfg["model"], model.eval(), run_cfg["dataset"], training, privacy, z, eps), split


def victims(cfg: config.AttackConfig) -> list[tuple[Victim, DataSplit]]:
    """The victims: a fresh model if --model or --dataset asks for one, else the training runs, else (saying
    so) the LeNet demonstration."""
    if cfg.fresh_victim:
        return [fresh_victim(cfg)]
    runs = training_runs(cfg)
    if not runs:
        print(
            f"note: no finished training run in {cfg.train_runs}/ (run `uv run train.py` first to attack your own "
            f"models); attacking the demonstration victim instead: a fresh {config.DEMO_MODEL} on "
            f"{'your images' if cfg.images else config.DEMO_DATASET}."
        )
        return [fresh_victim(cfg)]
    return [trained_victim(cfg, run) for run in runs]
