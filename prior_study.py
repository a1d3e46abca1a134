"""`gradient_attack.py --attacks prior-aware`: the prior-aware attack (attacks/prior_aware.py) against DP-SGD
training of a fresh model, one run per ε of `--mechanisms dp-sgd:EPS,...`, each `--trials` trainings.

Unlike the other attacks it watches a whole training rather than one shared update, so it has its own small
study: a run directory per ε under --out (config.json, then metrics.json with the success rate, its 95 %
interval and the bound for the same z, q, T and prior), listed in the same summary as the other attack runs.
The known examples are the first 99 of the training split; the priors are drawn from the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import config
import utils
from attacks.prior_aware import PriorAwareSetting, prior_aware_success
from data_sources import DataOptions, load_dataset
from defenses import parse_mechanisms
from models import create_model

KNOWN = 99  # examples the adversary knows; the target makes the 100th
PRIOR_SIZE = 10  # candidates per trial: baseline success 1/10, the bound's reference prior
DEFAULT_EPSILONS = "dp-sgd:1,4,8,16"


def epsilons(cfg: config.AttackConfig) -> list[float]:
    """The ε of every dp-sgd mechanism asked for (the default sweep when none is)."""
    specs = parse_mechanisms(cfg.mechanisms or [DEFAULT_EPSILONS])
    return [spec.strength for spec in specs]


def run_prior_study(cfg: config.AttackConfig) -> list[str]:
    """Each ε's run, unless it finished already; the names of the runs of this call."""
    dataset, model = cfg.dataset or "digits", cfg.model or "mlp"
    data = load_dataset(dataset, DataOptions(root=cfg.data_root, download=cfg.download, image_size=cfg.image_size))
    known, pool = (data.x_train[:KNOWN], data.y_train[:KNOWN]), (data.x_test, data.y_test)
    make_model = functools.partial(create_model, model, tuple(data.x_train.shape[1:]), data.num_classes, False)
    names = []
    for eps in epsilons(cfg):
        name = utils.safe_name(f"{dataset}-{model}-prior-aware-dp-sgd{eps:g}-s{cfg.seed}")
        names.append(name)
        run_dir = Path(cfg.out) / name
        if utils.run_is_done(run_dir) and not cfg.force:
            print(f"{name}: finished already, skipped (--force redoes it)")
            continue
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
        utils.write_json(run_dir / "config.json", {**fields, "run": name})
        setting = PriorAwareSetting(epsilon=eps, prior_size=PRIOR_SIZE, delta=1e-5)
        start = time.perf_counter()
        result = prior_aware_success(make_model, known, pool, setting, cfg.trials, cfg.seed)
        row: dict[str, Any] = {
            "run": name, "victim": model, "model": model, "dataset": dataset, "attack": "prior-aware",
            "mechanism": f"dp-sgd:{eps:g}", "mechanism_name": "dp-sgd", "strength": eps, "epsilon": eps,
            "max_grad_norm": setting.max_grad_norm, "batch_size": None, "seed": cfg.seed, **result,
            "seconds": time.perf_counter() - start,
        }  # fmt: skip
        utils.write_json(run_dir / "metrics.json", row)
        print(
            f"{name}: success {result['success_rate']:.2f} ({result['success_low']:.2f}-{result['success_high']:.2f}) "
            f"over {cfg.trials} trials; any attack <= {result['bound']:.2f}"
        )
    return names
