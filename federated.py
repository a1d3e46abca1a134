"""The federation: FedAvg on Flower with non-IID clients, client privacy, and a server that attacks what they send.

    uv run federated.py                                          # 10 clients, Dirichlet(0.5) digits, ig-weight at round 1
    uv run federated.py --privacy dp-sgd:8 --attack-rounds 1 5
    uv run federated.py --privacy secagg --alpha 1000 --clients 20 --fraction 0.5
    uv run federated.py --model fcnn --attack rtf --attack-rounds 3 --rounds 3

The apps live in federation.py (they also run on Flower's deployment engine: see the README), the study in
federated_runs.py; this entry point reads the command line first, so `--help` and a bad option answer before
PyTorch and Flower load.
"""

from __future__ import annotations

import config
import utils


def main(args: list[str] | None = None) -> None:
    cfg = config.parse(config.FederatedConfig, args)
    import federated_runs  # PyTorch and Flower load only for a valid command line

    federated_runs.run_study(cfg)


if __name__ == "__main__":
    utils.run_cli(main)
