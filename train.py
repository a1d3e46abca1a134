"""The training study: every model under every privacy mode on one dataset, and the benchmark table.

    uv run train.py                                   # cnn on faces: none, dp-sgd at ε 8/25/50, regularized
    uv run train.py --dataset digits --models cnn resnet50 --epochs 20

The study itself lives in training.py; this entry point reads the command line first, so `--help` and a bad
option answer before PyTorch loads.
"""

from __future__ import annotations

import config
import utils


def main(args: list[str] | None = None) -> None:
    cfg = config.parse(config.TrainConfig, args)
    import training  # PyTorch and Opacus load only for a valid command line

    training.run_study(cfg)


if __name__ == "__main__":
    utils.run_cli(main)
