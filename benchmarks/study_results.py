"""The studies' results: the WDS paper's and the thesis's tables, measured at small scale, reported
from the tracking store into ``docs/results.md``.

Each study is a recipe (its header says what it reproduces, how to run it, and its figures):

===============================================  ==========================================
recipe                                           reproduces
===============================================  ==========================================
recipes/wds/wds_study.yaml                       WDS paper Table 3 (NES, MSE vs full data)
recipes/wds/wds_study_variants.yaml              WDS Table 5; Table 1's CelluFormer row
recipes/wds/wds_study_r_ablation.yaml            WDS Tables 6-7 (R = 100 / 200 / 500)
recipes/wds/wds_study_nid.yaml                   WDS Table 1's MLP row; NID on an MLP
recipes/thesis/geneformer_celltype.yaml          thesis Table 3.1 (cell-type classification)
recipes/thesis/geneformer_patient.yaml           thesis Tables 3.5-3.8 (patient classification)
recipes/thesis/perturbation.yaml                 thesis Tables 3.2-3.3 (in silico deletion, Grubman)
recipes/thesis/perturbation_synthetic.yaml       thesis in silico perturbation protocol
===============================================  ==========================================

This script runs each recipe with ``grnx run`` in its own subprocess (as a user runs it; each into
the recipe's own ``tracking.experiment``), then, per experiment, writes the full ``grnx report``
(``grnx_core.report.write_report``) to ``docs/results/<experiment>.md`` and assembles
``docs/results.md``: for each study table of ``STUDY_TABLES`` (study table -> recipe -> metrics ->
paper figure) the measured table (``grnx_core.report.metric_table`` / ``markdown_table``), its
figure and CSV (``docs/results/figures``, ``docs/results/tables``), and the paper's figure beside it.
The WDS paper's tables are not stored here in full; its figures come from third-party reviews of
its ICLR 2025 submission that quote them (``QUOTED_FROM``), only where two or more reviews give the
same number unless marked, never from memory; a table no review quotes, and every thesis table,
reads "not available here".

    python benchmarks/study_results.py                         # run all, write docs/results.md
    python benchmarks/study_results.py --report-only           # rewrite it from the runs already tracked
    python benchmarks/study_results.py --recipes wds/wds_study_nid thesis/perturbation_synthetic
    python benchmarks/study_results.py --fresh-cache --tracking-uri sqlite:///mlflow/other.db

The default store is ``sqlite:///reports/study_results/mlflow.db`` (git-ignored, like ``reports/``;
not the user's ``mlflow/mlflow.db``), emptied at the start of a full run, so the document reports
only the runs of this invocation (the grnx cache still serves the stages computed before). In
another store a rerun supersedes the runs with the same params (``grnx report``'s rule). Recipes whose ``# Requires:`` files
are missing are skipped and their tables say so; a failed run is reported and the others go on.
``--report-only`` rewrites the tables from the store but not the list of ``grnx run`` calls and their
wall times (there were none): give ``--out`` elsewhere to keep the committed document's header.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from grn_benchmark import (  # noqa: E402
    Outcome,
    exit_status,
    grnx_command,
    missing_inputs,
    report_notes,
    run_all,
)

RECIPES = REPO_ROOT / "recipes"
DEFAULT_TRACKING_URI = "sqlite:///reports/study_results/mlflow.db"
DEFAULT_OUT = "docs/results.md"
NOT_AVAILABLE = "not available here"

#: The study recipes, paths under recipes/ without ``.yaml``, in the order they run.
STUDY_RECIPES: tuple[str, ...] = (
    "wds/wds_study",
    "wds/wds_study_variants",
    "wds/wds_study_r_ablation",
    "wds/wds_study_nid",
    "thesis/geneformer_celltype",
    "thesis/geneformer_patient",
    "thesis/perturbation",
    "thesis/perturbation_synthetic",
)


@dataclass(frozen=True)
class StudyTable:
    """One table of a study: which recipe measures it, which metrics, and the paper's figure."""

    title: str
    recipe: str  # path under recipes/ without .yaml
    metrics: tuple[tuple[str, str], ...]  # (evaluator id, metric) tabulated per leaf group
    aggregates: tuple[str, ...] = ()  # metrics the parent runs log (e.g. nes_mse against the full data)
    paper: str = NOT_AVAILABLE  # one line, for the index table
    paper_detail: tuple[str, ...] = ()  # markdown lines under the table's heading
    run_metrics: str | None = None  # a prefix of metrics a stage logs itself, <prefix><step>/<name>


#: Where the paper's figures below come from (the paper itself is not stored in this environment).
QUOTED_FROM = (
    "quoted by third-party reviews of the ICLR 2025 submission of the WDS paper (OpenReview "
    "44IKUSdbUD; stored review files 63275323477, 66162791613, 63242777074, 65998932195, 65995206838, "
    "65773597899 of the code corpus): SEA-AD MTG neurons, CelluFormer, NES against BioGRID pairs of "
    "DisGeNET Alzheimer's genes, means of 5 runs. Each value is given alike by two or more reviews "
    "unless marked * (one review); the reviews number the tables differently (Table 3 here is their "
    "Table 2, 3 or 4)"
)

_PAPER_TABLE_3 = (
    f"Paper figures, {QUOTED_FROM}:",
    "",
    "| cell type | full data | WDS 1% | uniform 1% | WDS 10% | uniform 10% | MSE at 1%, WDS / uniform |",
    "|---|---|---|---|---|---|---|",
    "| L6_CT | 1.18 | 1.19 | 0.85 | — | 0.91* | 0.0000 / 0.0207 |",
    "| L6b | 1.13 | 1.17 | 0.79 | 1.21 | 1.20 | 0.0004* / 0.0226* |",
    "| L5_ET | 1.15 | 0.95 | 0.90* | — | — | 0.0082* / — |",
    "| Pax6 | 1.25 | 1.08 | — | — | — | — |",
    "| L5_6_NP | 1.21 | 1.13 | — | — | — | — |",
    "| L6_IT_Car3 | 1.22 | 1.20* | — | — | — | — |",
    "",
    "Full-data baselines quoted (the paper's RQ1 table): NID on an MLP 1.54 on L6_CT (the table's "
    "highest), 1.49* on L5_6_NP; scGPT 1.50 on L5_6_NP; CS-CORE 1.06 on all neurons (CelluFormer "
    "1.17); Pearson -0.21* on L6_CT. No review quotes a Spearman or GRNBoost2 figure.",
    "",
)

_PAPER_TABLE_1 = (
    f"Paper figures, {QUOTED_FROM}: all neuronal cell types, CelluFormer accuracy 98.12%, F1 98.12; "
    "MLP accuracy 97.25%, F1 97.23 (MLPs trained on single cell types: F1 62-95*).",
    "",
)


STUDY_TABLES: tuple[StudyTable, ...] = (
    StudyTable(
        "WDS paper Table 3: NES by sampler and fraction, MSE against the full-data NES",
        "wds/wds_study",
        (("nes_stability", "nes"),),
        aggregates=("nes_mse",),
        paper="quoted: WDS 1% NES 0.95-1.19 vs full data 1.13-1.25; uniform 1% 0.79-0.90",
        paper_detail=_PAPER_TABLE_3,
    ),
    StudyTable(
        "WDS paper Table 5 and per-cell-type lists: attention, Pearson, Spearman over all cells / disease cells / disease minus control / one cell type",
        "wds/wds_study_variants",
        (("nes_planted", "nes"), ("nes_disease", "nes")),
        paper="Table 5 not available here (no review quotes it); per-cell-type NES quoted",
        paper_detail=(
            f"Paper figures, {QUOTED_FROM}. Table 5: not available here (no review quotes it). The "
            "per-cell-type full-data NES (the paper's RQ1 table), CelluFormer attention: L6_CT 1.18, "
            "L5_ET 1.15, Pax6 1.25, L5_6_NP 1.21, L6b 1.13, L6_IT_Car3 1.22, Chandelier 1.17*, all "
            "neurons 1.17; baselines: NID 1.54 (L6_CT), 1.49* (L5_6_NP); scGPT 1.50 (L5_6_NP), 1.23* "
            "(L5_ET, L6b); CS-CORE 1.06 (all neurons); Pearson -0.21* (L6_CT).",
            "",
        ),
    ),
    StudyTable(
        "WDS paper Table 1, CelluFormer row: held-out classification",
        "wds/wds_study_variants",
        (("classification", "accuracy"), ("classification", "macro_f1")),
        paper="quoted: accuracy 98.12%, F1 98.12 (all neuronal types)",
        paper_detail=_PAPER_TABLE_1,
    ),
    StudyTable(
        "WDS paper Tables 6-7: ablation of R, the number of WDS hashes",
        "wds/wds_study_r_ablation",
        (("nes_stability", "nes"),),
        aggregates=("nes_mse",),
        paper="not available here (no review quotes the R ablation or the R used)",
    ),
    StudyTable(
        "WDS paper Table 1, MLP row: held-out classification",
        "wds/wds_study_nid",
        (("classification", "accuracy"), ("classification", "macro_f1")),
        paper="quoted: accuracy 97.25%, F1 97.23 (all neuronal types)",
        paper_detail=_PAPER_TABLE_1,
    ),
    StudyTable(
        "WDS paper baseline NID on an MLP: NES against the planted and the disease edges",
        "wds/wds_study_nid",
        (("nes_planted", "nes"), ("nes_disease", "nes")),
        paper="quoted: NID NES 1.54 on L6_CT (CelluFormer 1.18), 1.49* on L5_6_NP (1.21)",
        paper_detail=(
            f"Paper figures, {QUOTED_FROM}: NID on an MLP, full data, 1.54 on L6_CT (CelluFormer "
            "attention 1.18) and 1.49* on L5_6_NP (CelluFormer 1.21).",
            "",
        ),
    ),
    StudyTable(
        "Thesis Table 3.1: Geneformer cell-type classification (held-out cells)",
        "thesis/geneformer_celltype",
        (
            ("classification", "accuracy"),
            ("classification", "balanced_accuracy"),
            ("classification", "macro_f1"),
        ),
        paper="accuracy ~0.99 with 2,000 cells (as issue 18 states it; the thesis is not stored here)",
    ),
    StudyTable(
        "Thesis Tables 3.5-3.8: patient classification (AD vs control), 2 and 5 frozen layers",
        "thesis/geneformer_patient",
        (
            ("classification", "accuracy"),
            ("classification", "balanced_accuracy"),
            ("classification", "macro_f1"),
        ),
    ),
    StudyTable(
        "Thesis Tables 3.2-3.3: in silico deletion toward neurons, without and with alternative states",
        "thesis/perturbation",
        (("classification", "accuracy"),),
        run_metrics="perturbation/",
    ),
    StudyTable(
        "Thesis in silico perturbation protocol: the classifier the shifts are read from",
        "thesis/perturbation_synthetic",
        (("classification", "accuracy"), ("classification", "balanced_accuracy")),
    ),
)


def recipe_path(recipe: str) -> Path:
    return RECIPES / f"{recipe}.yaml"


def recipe_identity(recipe: str) -> tuple[str, str]:
    """(recipe name, the tag ``grnx.recipe`` of its runs; tracking experiment) of a study recipe."""
    from grnx_core.recipe import load_recipe_data

    data = load_recipe_data(recipe_path(recipe)).data
    experiment = (data.get("tracking") or {}).get("experiment") or data["name"]
    return data["name"], experiment


def run_recipe(recipe: str, options: argparse.Namespace) -> Outcome:
    import subprocess

    path = recipe_path(recipe)
    command = ["grnx", "run", str(path.relative_to(REPO_ROOT)), "--tracking-uri", options.tracking_uri]
    missing = missing_inputs(path)
    if missing:
        return Outcome(recipe, command, None, reason=f"missing {', '.join(missing)}")
    print(f"\n== {recipe}: {shlex.join(command)}", flush=True)
    environment = dict(os.environ)
    if options.cache_dir is not None:
        environment["GRNX_CACHE_DIR"] = options.cache_dir
    started = time.perf_counter()
    returncode = subprocess.run([*grnx_command(), *command[1:]], cwd=REPO_ROOT, env=environment).returncode
    return Outcome(recipe, command, returncode, time.perf_counter() - started)


# -- the document -------------------------------------------------------------------------------


def _aggregate_lines(section: Any, names: tuple[str, ...]) -> list[str]:
    from grnx_core.report import format_value, parent_aggregates

    aggregates = parent_aggregates(section)
    present = [name for name in names if name in aggregates.columns]
    if not present:
        return [f"(The parent runs logged no {', '.join(names)}.)", ""]
    header = ["group", "subject", *present]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for _, row in aggregates.iterrows():
        if all(str(format_value(row[name])) == format_value(None) for name in present):
            continue
        cells = [
            str(row["group"]) or "—",
            str(row["subject"]) or "—",
            *(format_value(row[n]) for n in present),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _run_metric_lines(section: Any, prefix: str) -> list[str]:
    """A step x metric table of what stages logged as ``<prefix><step>/<name>`` (mean over the leaves)."""
    from grnx_core.report import format_value

    found = [c for c in section.rows.columns if isinstance(c, str) and c.startswith(prefix)]
    if not found:
        return [f"(No finished run logged a `{prefix}` metric.)", ""]
    steps = list(dict.fromkeys(c[len(prefix) :].rsplit("/", 1)[0] for c in found))
    names = list(dict.fromkeys(c.rsplit("/", 1)[1] for c in found))
    lines = [
        f"**{prefix}<step>/<metric>** (mean over {len(section.rows)} run(s))",
        "",
        "| step | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def shown(column: str) -> str:
        if column not in section.rows:
            return "—"
        value = section.rows[column].mean()
        return f"{int(value):,}" if float(value).is_integer() else format_value(value)  # counts as counts

    for step in steps:
        cells = [shown(f"{prefix}{step}/{name}") for name in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def study_table_lines(
    study: StudyTable, section: Any, figures_dir: Path, tables_dir: Path, out_dir: Path, doc_dir: Path
) -> list[str]:
    """The measured tables (and figures, CSVs) of one study table from its recipe's section."""
    import matplotlib.pyplot as plt

    from grnx_core.report import _safe, choose_x, markdown_table, metric_figure, metric_table

    lines: list[str] = []
    x_column = choose_x(section)
    for evaluator, metric in study.metrics:
        result = metric_table(section, evaluator, metric)
        lines += [f"**{evaluator}: {metric}**", ""]
        if result.table.empty:
            lines += [f"(No finished run logged `{evaluator}` `{metric}`.)", ""]
            continue
        lines += [markdown_table(result, section.columns, section.extractors), ""]
        stem = _safe(f"{section.recipe}_{evaluator}_{metric}")
        result.table.to_csv(tables_dir / f"{stem}.csv", index=False)
        links = [f"numbers: `{os.path.relpath(out_dir / 'tables' / f'{stem}.csv', doc_dir)}`"]
        if x_column is not None:
            figure = metric_figure(result, section, x_column)
            if figure is not None:
                name = f"{stem}_vs_{_safe(x_column.split('.')[-1])}.png"
                figure.savefig(figures_dir / name, dpi=110)
                plt.close(figure)
                relative = os.path.relpath(out_dir / "figures" / name, doc_dir)
                lines += [f"![{evaluator} {metric} against {x_column}]({relative})", ""]
        lines += [f"({'; '.join(links)})", ""]
    if study.run_metrics:
        lines += _run_metric_lines(section, study.run_metrics)
    if study.aggregates:
        lines += [f"**Parent aggregates: {', '.join(study.aggregates)}** (one value per group)", ""]
        lines += _aggregate_lines(section, study.aggregates)
    return lines


def write_results(
    tracking_uri: str, out: Path, command: str, notes: list[str], recipes: tuple[str, ...]
) -> Path:
    """Write each experiment's full report beside ``out`` and ``out`` itself; returns ``out``."""
    from grnx_core.atomic import atomic_path, write_text
    from grnx_core.errors import GrnxError
    from grnx_core.report import experiment_sections, write_report
    from grnx_core.tracking import Tracker

    tracker = Tracker(tracking_uri)
    doc_dir = out.parent
    assets = out.with_suffix("")
    identities = {recipe: recipe_identity(recipe) for recipe in recipes}
    experiments = list(dict.fromkeys(experiment for _, experiment in identities.values()))
    full_reports: dict[str, Path] = {}
    sections: dict[str, dict[str, Any]] = {}
    problems: dict[str, str] = {}
    for experiment in experiments:
        try:
            report = write_report(
                tracker, experiment, assets / f"{experiment}.md", command=command, notes=notes
            )
            full_reports[experiment] = report.path
            sections[experiment] = {s.recipe: s for s in experiment_sections(tracker, experiment)}
        except GrnxError as error:
            problems[experiment] = str(error)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Study results: the WDS paper's and the thesis's tables, measured at small scale",
        "",
        f"Made by: `{command}` on {when}, from the tracking store `{tracking_uri}`. Generated: do not "
        "edit by hand; rerun the command (`--report-only` rewrites it from the tracked runs).",
        "",
        "Each study is a recipe whose header says what it reproduces, on what data (synthetic, or the "
        "48 Grubman 2019 nuclei in `../shared/data`: far smaller than the paper's), and what it "
        "measured. Beside each measured table is the paper's figure. The WDS paper (Wu et al., "
        "arXiv:2410.15616) is not stored here in full: its figures are those that third-party "
        "reviews of its ICLR 2025 submission quote (sources under each table); the thesis could not "
        'be found, so its tables, and any WDS table no review quotes, read "not available here" '
        "rather than a number from memory. The paper ran on SEA-AD MTG (1.24M cells); the "
        "figures here come from data thousands of times smaller, so compare the pattern (WDS vs "
        "uniform, each method vs random and Pearson), not the values.",
        "",
        "| study table | recipe | metrics | paper |",
        "|---|---|---|---|",
    ]
    for study in STUDY_TABLES:
        if study.recipe not in recipes:
            continue
        metrics = ", ".join(f"`{e}/{m}`" for e, m in study.metrics)
        if study.aggregates:
            metrics += ", " + ", ".join(f"`{a}` (parent)" for a in study.aggregates)
        lines.append(f"| {study.title} | `recipes/{study.recipe}.yaml` | {metrics} | {study.paper} |")
    lines.append("")
    if notes:
        lines += [*notes, ""]
    lines += ["Full reports, one per experiment (every metric, every recipe):", ""]
    for experiment in experiments:
        if experiment in full_reports:
            lines.append(
                f"- `{experiment}`: [{os.path.relpath(full_reports[experiment], doc_dir)}]"
                f"({os.path.relpath(full_reports[experiment], doc_dir)})"
            )
        else:
            lines.append(f"- `{experiment}`: no report ({problems[experiment]})")
    lines.append("")
    with (
        atomic_path(assets / "figures", directory=True) as figures_dir,
        atomic_path(assets / "tables", directory=True) as tables_dir,
    ):
        for study in STUDY_TABLES:
            if study.recipe not in recipes:
                continue
            name, experiment = identities[study.recipe]
            lines += [f"## {study.title}", ""]
            lines += list(study.paper_detail) or [f"paper: {study.paper}", ""]
            lines += [f"Measured: recipe `recipes/{study.recipe}.yaml` (experiment `{experiment}`).", ""]
            section = sections.get(experiment, {}).get(name)
            if section is None:
                reason = problems.get(experiment) or f"no run of recipe {name!r} in experiment {experiment!r}"
                lines += [f"Not measured: {reason}.", ""]
                continue
            if not section.leaves:
                lines += ["Not measured: no finished run.", ""]
                continue
            lines += study_table_lines(study, section, figures_dir, tables_dir, assets, doc_dir)
    write_text(out, "\n".join(lines).rstrip() + "\n")
    return out


def reset_default_store() -> None:
    """Empty this script's own store before a full run, so the document holds only the runs made
    now: a run of older code logs fewer settings (one added since, at its default, is absent) and
    would be reported as a group of its own rather than superseded. Only the default store, which
    nothing else writes, is emptied; the grnx cache is kept."""
    import shutil

    folder = REPO_ROOT / "reports" / "study_results"
    (folder / "mlflow.db").unlink(missing_ok=True)
    shutil.rmtree(folder / "artifacts", ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        default=None,
        metavar="PATH",
        help=f"study recipes to run and report (default: all of {', '.join(STUDY_RECIPES)})",
    )
    parser.add_argument(
        "--tracking-uri", default=DEFAULT_TRACKING_URI, help=f"MLflow store (default {DEFAULT_TRACKING_URI})"
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"the document, from the repository root (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the document from the runs already tracked"
    )
    parser.add_argument(
        "--fresh-cache",
        action="store_true",
        help="run with an empty grnx cache (a temporary GRNX_CACHE_DIR, removed after), so the wall "
        "times are those of a first run",
    )
    options = parser.parse_args(argv)
    recipes = [
        name.removeprefix("recipes/").removesuffix(".yaml") for name in options.recipes or STUDY_RECIPES
    ]
    unknown = sorted(set(recipes) - set(STUDY_RECIPES))
    if unknown:
        parser.error(
            f"unknown study recipe(s) {', '.join(unknown)}; the studies are {', '.join(STUDY_RECIPES)}"
        )
    options.recipes = tuple(recipes)
    return options


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    os.chdir(REPO_ROOT)  # the store, --out and the recipes are paths from the repository root
    outcomes: list[Outcome] = []
    total_s = None
    options.cache_dir = None
    if not options.report_only:
        if options.tracking_uri == DEFAULT_TRACKING_URI and options.recipes == STUDY_RECIPES:
            reset_default_store()
        outcomes, total_s = run_all(options.recipes, run_recipe, options, "grnx-study-cache-")
    command = shlex.join(["python", "benchmarks/study_results.py", *argv])
    out = write_results(
        options.tracking_uri,
        Path(options.out),
        command,
        report_notes(outcomes, total_s, options.fresh_cache),
        options.recipes,
    )
    print(f"\nwrote {out}")
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
