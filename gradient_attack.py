"""The leakage study: how much of a client's private batch can a server rebuild from what the client shares?

    uv run gradient_attack.py                             # every finished run in runs/train, the strongest attack
    uv run gradient_attack.py --from-run 'runs/train/*-cnn-*' --batch-sizes 1 4
    uv run gradient_attack.py --model lenet --dataset digits --attacks dlg ig ig-naive --mechanisms none prune:0.5
    uv run gradient_attack.py --model fcnn --attacks giavmp rtf --batch-sizes 16 64 --mechanisms none dp-sgd:8
    uv run gradient_attack.py --model mlp --attacks dlf ig-weight --batch-sizes 5 --local-batches 10 --local-epochs 10 --num-images 50

With no training run, it attacks the demonstration victim (a fresh LeNet on digits) under the default grid of
mechanisms. The study itself lives in leakage.py; this entry point reads the command line first, so `--help`
and a bad option answer before PyTorch loads.
"""

from __future__ import annotations

import config
import utils


def main(args: list[str] | None = None) -> None:
    cfg = config.parse(config.AttackConfig, args)
    import leakage  # PyTorch and the attacks load only for a valid command line

    leakage.run_study(cfg)


if __name__ == "__main__":
    utils.run_cli(main)
