"""How long `uv run analysis.py` takes on a given runs/ tree, split into importing the stack, reading the runs
and drawing every figure and table. Takes analysis.py's own options:

    uv run python bench/bench_analysis.py --runs runs --out /tmp/static-bench
"""

import sys
import time
from pathlib import Path

start = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the flat top-level modules
import analysis  # noqa: E402  (timed: torch, opacus and matplotlib come with it)
import config  # noqa: E402
from results import load_study  # noqa: E402

imported = time.perf_counter()
cfg = config.parse(config.AnalysisConfig)
study = load_study(cfg.runs)
loaded = time.perf_counter()
analysis.build_report(study, cfg)
built = time.perf_counter()
print(f"{len(study.train)} training and {len(study.attack)} attack runs, {len(list(cfg.out.glob('*.png')))} figures")
print(
    f"import {imported - start:.1f} s | read runs {loaded - imported:.2f} s | figures + tables {built - loaded:.1f} s"
)
