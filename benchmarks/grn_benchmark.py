"""The GRN benchmark: extractors x datasets x samplers x fractions x repeats, run through the engine
and reported from the tracking store.

Each dataset family is a recipe in ``recipes/benchmark/`` with a ``sweep`` over ``sampler.name``
and ``sampler.params.fraction``, ``sampler.repeats`` repeats per point (nested MLflow runs) and a
full-data reference run; every extractor is scored by the ``auprc`` evaluator (AUPRC, AUROC, EPR
with their random baselines) next to Pearson over the same pairs (``baseline_extractor: pearson``):

=======================  ==================================================================  =====
recipe                   extractors, data                                                    data
=======================  ==================================================================  =====
synthetic                pearson, spearman, cscore, grnboost2, genie3; synthetic v2 counts   none
synthetic_rare_state     the same, scored against the edges of a 2% rare state               none
synthetic_wds_settings   the same with WDS only: X or counts hashed, temperature 1 or 0.25   none
synthetic_models         CelluFormer attention (raw, APC, centred), gene-embedding cosine    none
synthetic_nid            NID on an MLP trained on each sample                                none
beeline_gsd              pearson, spearman, grnboost2, genie3; BEELINE GSD (BoolODE)          shared
beeline_mdc              the same on BEELINE mDC vs cell-type ChIP-seq (10/25/50%)           shared
kang2018                 pearson, spearman, cscore, grnboost2, genie3; Kang 2018 PBMC        shared
=======================  ==================================================================  =====

This script runs the chosen recipes one after another, each with ``grnx run`` in its own
subprocess (as a user runs it: the resolved recipe, overrides, code version and data digest are
logged with every run), into one MLflow experiment, with overrides for the scale options; then it
writes the report (``grnx_core.report.write_report``, what ``grnx report`` runs) with the command
and the ``grnx run`` calls at its top. Recipes whose ``# Requires:`` files are missing are skipped
with a message. A run that fails is reported and the others go on; the report then counts what
finished.

    python benchmarks/grn_benchmark.py --quick --fresh-cache   # docs/benchmark_quick.md (its header gives the time)
    python benchmarks/grn_benchmark.py              # every recipe at full scale (many hours)
    python benchmarks/grn_benchmark.py --recipes synthetic beeline_gsd --repeats 5 --fractions 0.01 0.1
    python benchmarks/grn_benchmark.py --report-only --experiment grn_benchmark --out reports/grn

``--quick``: recipes synthetic and synthetic_rare_state on 2,000 simulated cells, 3 repeats at 5
and 10% for each of uniform, WDS, geosketch and scSampler, extractors pearson, spearman, cscore and
grnboost2 (one worker, no Ray), into experiment ``grn_benchmark_quick``; report (AUPRC, EPR, AUROC)
at ``docs/benchmark_quick.md``. Any option given with ``--quick`` replaces its quick value.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes" / "benchmark"
REQUIRES = re.compile(r"^#\s*Requires:\s*(\S+)", re.MULTILINE)

QUICK: dict[str, Any] = {
    "recipes": ["synthetic", "synthetic_rare_state"],
    "repeats": 3,
    "fractions": [0.05, 0.1],
    "samplers": ["uniform", "wds", "geosketch", "scsampler"],
    "extractors": ["pearson", "spearman", "cscore", "grnboost2"],
    "cells": 2000,
    "set": ["execution.num_workers=1"],
    "experiment": "grn_benchmark_quick",
    "out": "docs/benchmark_quick.md",
    "metric": ["auprc", "epr", "auroc"],
}
DEFAULT_EXPERIMENT = "grn_benchmark"


@dataclass
class Outcome:
    recipe: str
    command: list[str]
    returncode: int | None  # None: skipped
    wall_s: float = 0.0
    reason: str = ""


def available_recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def missing_inputs(path: Path) -> list[str]:
    """The ``# Requires:`` files of a recipe's header that are not there (paths from the repo root)."""
    return [name for name in REQUIRES.findall(path.read_text()) if not (REPO_ROOT / name).exists()]


def _flow(value: Any) -> str:
    """A value as one line of YAML flow style, as an override takes it."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()


def overrides_for(path: Path, options: argparse.Namespace) -> list[str]:
    """The ``KEY=VALUE`` overrides that give ``path`` the scale the options ask for."""
    from grnx_core.recipe import load_recipe_data

    data = load_recipe_data(path).data
    overrides: list[str] = []
    if options.repeats is not None:
        overrides.append(f"sampler.repeats={options.repeats}")
    grid = dict((data.get("sweep") or {}).get("grid") or {})
    changed = False
    if options.fractions and "sampler.params.fraction" in grid:
        grid["sampler.params.fraction"] = [float(f) for f in options.fractions]
        changed = True
    # Only where the recipe compares samplers (synthetic_wds_settings sweeps one sampler's settings).
    if options.samplers and len(grid.get("sampler.name") or []) > 1:
        grid["sampler.name"] = list(options.samplers)
        changed = True
    if changed:
        overrides.append(f"sweep.grid={_flow(grid)}")
    if options.extractors:
        keep = set(options.extractors)
        for evaluator in data.get("evaluators") or []:  # the baseline every evaluator scores against
            baseline = (evaluator.get("params") or {}).get("baseline_extractor")
            if baseline:
                keep.add(baseline)
        steps = data.get("extractors") or []
        kept = [step for step in steps if (step.get("id") or step["name"]) in keep or step["name"] in keep]
        if len(kept) < len(steps):
            overrides.append(f"extractors={_flow(kept)}")
    if options.cells is not None and (data.get("data") or {}).get("name") == "synthetic":
        overrides.append(f"data.params.n_cells={options.cells}")
    overrides.extend(options.set or [])
    overrides.append(f"tracking.experiment={options.experiment}")
    return overrides


def grnx_command() -> list[str]:
    script = Path(sys.executable).with_name("grnx")
    if script.exists():
        return [str(script)]
    found = shutil.which("grnx")
    return [found] if found else [sys.executable, "-m", "grnx_core.cli"]


def run_recipe(name: str, options: argparse.Namespace) -> Outcome:
    path = RECIPES / f"{name}.yaml"
    relative = path.relative_to(REPO_ROOT)
    missing = missing_inputs(path)
    command = ["grnx", "run", str(relative), *overrides_for(path, options)]
    if options.tracking_uri:
        command += ["--tracking-uri", options.tracking_uri]
    if missing:
        return Outcome(name, command, None, reason=f"missing {', '.join(missing)}")
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    if options.dry_run:
        return Outcome(name, command, None, reason="dry run")
    started = time.perf_counter()
    environment = dict(os.environ)
    if options.cache_dir is not None:
        environment["GRNX_CACHE_DIR"] = options.cache_dir
    returncode = subprocess.run([*grnx_command(), *command[1:]], cwd=REPO_ROOT, env=environment).returncode
    return Outcome(name, command, returncode, time.perf_counter() - started)


def _invocation(argv: list[str]) -> str:
    return shlex.join(["python", "benchmarks/grn_benchmark.py", *argv])


def report_notes(outcomes: list[Outcome], total_s: float | None, fresh_cache: bool) -> list[str]:
    lines = []
    if outcomes:
        lines.append("It ran, from the repository root:")
        lines.append("")
        for outcome in outcomes:
            if outcome.returncode is None:
                status = f"skipped: {outcome.reason}"
            elif outcome.returncode == 0:
                status = f"{outcome.wall_s:.0f} s wall"
            else:
                status = f"FAILED (exit {outcome.returncode}) after {outcome.wall_s:.0f} s"
            lines.append(f"- `{shlex.join(outcome.command)}` ({status})")
        lines.append("")
    if total_s is not None:
        cache = (
            "an empty grnx cache"
            if fresh_cache
            else "the user's grnx cache (stages run before are read from it)"
        )
        lines.append(f"Total wall time of the runs: {total_s / 60:.1f} min, with {cache}.")
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the small form docs/benchmark_quick.md reports")
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"recipes to run (default: all of {', '.join(available_recipes())})",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="sampler.repeats (default: the recipe's, 20)"
    )
    parser.add_argument(
        "--fractions", nargs="+", type=float, default=None, help="fractions to sweep (default: the recipe's)"
    )
    parser.add_argument(
        "--samplers", nargs="+", default=None, help="samplers to sweep (default: the recipe's)"
    )
    parser.add_argument(
        "--extractors",
        nargs="+",
        default=None,
        metavar="ID",
        help="keep only these extractors (and each evaluator's baseline_extractor)",
    )
    parser.add_argument(
        "--cells", type=int, default=None, help="data.params.n_cells of the synthetic recipes"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an override for every recipe (repeatable)",
    )
    parser.add_argument(
        "--experiment", default=None, help=f"MLflow experiment of every run (default {DEFAULT_EXPERIMENT})"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlflow/mlflow.db)"
    )
    parser.add_argument(
        "--out", default=None, help="report folder or .md file (default reports/<experiment>/)"
    )
    parser.add_argument(
        "--metric",
        nargs="+",
        default=None,
        help="report these evaluator metrics (default: all with a direction)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the runs already tracked"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the grnx run commands and stop")
    parser.add_argument(
        "--fresh-cache",
        action="store_true",
        help="run with an empty grnx cache (a temporary GRNX_CACHE_DIR, removed after), so the wall "
        "times are those of a first run",
    )
    options = parser.parse_args(argv)
    if options.quick:
        for key, value in QUICK.items():
            if getattr(options, key) is None:
                setattr(options, key, value)
    options.experiment = options.experiment or DEFAULT_EXPERIMENT
    options.recipes = options.recipes or available_recipes()
    unknown = sorted(set(options.recipes) - set(available_recipes()))
    if unknown:
        parser.error(
            f"unknown recipe(s) {', '.join(unknown)}; recipes/benchmark/ has {', '.join(available_recipes())}"
        )
    return options


def run_all(
    names: Sequence[str],
    run_one: Callable[[str, argparse.Namespace], Outcome],
    options: argparse.Namespace,
    cache_prefix: str,
) -> tuple[list[Outcome], float]:
    """Run each recipe with ``run_one``; with ``--fresh-cache`` in a temporary grnx cache removed after.

    Returns the outcomes and the wall seconds of all runs together.
    """
    scratch = tempfile.mkdtemp(prefix=cache_prefix) if options.fresh_cache else None
    options.cache_dir = scratch
    started = time.perf_counter()
    try:
        outcomes = [run_one(name, options) for name in names]
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return outcomes, time.perf_counter() - started


def exit_status(outcomes: list[Outcome]) -> int:
    """1 (naming them on stderr) when a recipe's run failed, else 0; skipped recipes do not count."""
    failed = [o.recipe for o in outcomes if o.returncode not in (0, None)]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    outcomes: list[Outcome] = []
    total_s = None
    options.cache_dir = None
    if not options.report_only:
        outcomes, total_s = run_all(options.recipes, run_recipe, options, "grnx-benchmark-cache-")
        for outcome in outcomes:
            if outcome.returncode is None:
                print(f"skipped {outcome.recipe}: {outcome.reason}")
        if options.dry_run:
            return 0
    from grnx_core.report import write_report
    from grnx_core.tracking import Tracker

    report = write_report(
        Tracker(options.tracking_uri),
        options.experiment,
        Path(options.out) if options.out else None,
        metrics=options.metric,
        command=_invocation(argv),
        notes=report_notes(outcomes, total_s, options.fresh_cache),
    )
    print(f"\nwrote {report.path} ({len(report.tables)} tables, {len(report.figures)} figures)")
    if total_s is not None:
        print(f"runs took {total_s / 60:.1f} min wall")
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
