"""Per-target tree regressions (GRNBoost2, GENIE3) over a gene universe, in-process or on Ray.

docs/methods/extractors.md#grnboost2-and-genie3. For each target gene ``t`` the expression of ``t`` is regressed on the
candidate regulators (the TF list, else every gene of the universe; never ``t`` itself), and the
regressor's feature importances become directed links ``regulator -> target``. The per-target fit
is arboreto's own: ``arboreto.core.fit_model`` (its regressor kwargs ``SGBM_KWARGS`` / ``RF_KWARGS``
and, for GRNBoost2, its out-of-bag early stopping over ``EARLY_STOP_WINDOW_LENGTH`` = 25 rounds) and
``arboreto.core.to_feature_importances`` (GBM importances multiplied by the number of trees kept).
Source: arboreto 0.1.6, ``arboreto/core.py`` (https://github.com/aertslab/arboreto); Moerman et
al., Bioinformatics 2019 (https://doi.org/10.1093/bioinformatics/bty916); Huynh-Thu et al., PLoS
ONE 2010 (https://doi.org/10.1371/journal.pone.0012776).

arboreto's Dask driver (``arboreto.algo``) is not used: it breaks on current Dask. Targets are
independent, so they are split into chunks run as Ray tasks (or in this process with one worker).
Each target's regressor gets its own seed, derived from the step's seed and the target's gene id
(arboreto gives every target the same seed), so results depend neither on the number of workers
nor on which other genes are in the universe.

Expression: arboreto takes a dense cells x genes matrix of whatever values it is given; its
tutorials and pySCENIC feed it normalised, log-transformed expression. grnx reads ``X`` (the
prepared, e.g. ``normalize_total`` + ``log1p``, values) unless ``layer`` is set. The universe is
densified (``n_cells x n_genes`` values, float32 for the regulators as scikit-learn's trees use).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from grnx_core import DataError, Extractor, Interactions, RunContext
from grnx_core.components import seed_field
from grnx_core.ray_connect import init_ray
from grnx_core.recipe import derive_seed
from grnx_plugins.extractors._universe import (
    UniverseParams,
    read_gene_list,
    universe_file,
    universe_indices,
)

#: Seconds of targets fitted in-process to decide whether Ray pays (``num_workers`` unset).
PROBE_SECONDS = 2.0
#: About what starting a local Ray and its workers (each importing scikit-learn and arboreto) costs.
RAY_START_SECONDS = 10.0
#: Chunks per worker: enough to even out targets whose early stopping comes late, few enough that
#: the per-task overhead (and the matrix lookup in the object store) stays small.
CHUNKS_PER_WORKER = 4


@dataclass(frozen=True)
class Regressor:
    """One of arboreto's regressor profiles: its type for ``fit_model`` and its kwargs."""

    regressor_type: str  # "GBM" or "RF", as arboreto names them
    kwargs: dict[str, Any]
    early_stop_window: int


def arboreto_profile(method: str, n_estimators: int | None, early_stop_window: int) -> Regressor:
    """arboreto's kwargs for ``grnboost2`` (stochastic GBM) or ``genie3`` (random forest)."""
    from arboreto.core import RF_KWARGS, SGBM_KWARGS

    regressor_type, defaults = {"grnboost2": ("GBM", SGBM_KWARGS), "genie3": ("RF", RF_KWARGS)}[method]
    kwargs = dict(defaults)
    if n_estimators is not None:
        kwargs["n_estimators"] = n_estimators
    return Regressor(regressor_type, kwargs, early_stop_window)


def target_seed(base_seed: int, gene: str) -> int:
    """The seed of one target's regressor: fixed by the step's seed and the target's gene id."""
    return derive_seed(base_seed, f"target/{gene}")


def fit_targets(
    regressor: Regressor,
    expression: np.ndarray,
    regulator_columns: np.ndarray,
    target_columns: np.ndarray,
    seeds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Importances (targets x regulators, 0 at a target's own column) and trees kept per target.

    ``expression`` is the dense cells x universe matrix; columns index into it. The regulators are
    cast to float32 once (scikit-learn's trees cast X to float32 themselves, so results equal
    arboreto called on the original matrix); each target's values keep their dtype.
    """
    from arboreto.core import fit_model, to_feature_importances

    regulators = np.ascontiguousarray(expression[:, regulator_columns], dtype=np.float32)
    own_position = {int(column): position for position, column in enumerate(regulator_columns)}
    importances = np.zeros((len(target_columns), len(regulator_columns)))
    n_trees = np.zeros(len(target_columns), dtype=np.int64)
    for row, (column, seed) in enumerate(zip(target_columns, seeds, strict=True)):
        values = expression[:, column]
        keep = np.ones(len(regulator_columns), dtype=bool)
        if int(column) in own_position:
            keep[own_position[int(column)]] = False
        if not keep.any() or np.ptp(values) == 0:
            # No regulator but itself, or nothing to explain: arboreto returns no link either.
            continue
        predictors = regulators if keep.all() else regulators[:, keep]
        model = fit_model(
            regressor.regressor_type,
            regressor.kwargs,
            predictors,
            values,
            early_stop_window_length=regressor.early_stop_window,
            seed=int(seed),
        )
        importances[row, keep] = to_feature_importances(regressor.regressor_type, regressor.kwargs, model)
        n_trees[row] = len(model.estimators_)
    return importances, n_trees


def _fit_chunk(
    regressor: Regressor,
    expression: np.ndarray,
    regulator_columns: np.ndarray,
    target_columns: np.ndarray,
    seeds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One Ray task: the same as :func:`fit_targets` (its own name so Ray labels the tasks)."""
    return fit_targets(regressor, expression, regulator_columns, target_columns, seeds)


def local_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run_regressions(
    regressor: Regressor,
    expression: np.ndarray,
    regulator_columns: np.ndarray,
    target_columns: np.ndarray,
    seeds: np.ndarray,
    *,
    num_workers: int | None,
    ray_address: str | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:func:`fit_targets` over every target: in this process with one local worker, else on Ray.

    Ray: a running Ray (``ray.init`` done by the caller) is used as it is; with ``ray_address``
    grnx connects to that cluster; else it starts a local Ray with ``num_workers`` CPUs and stops
    it afterwards. At most ``num_workers`` chunks run at once (a cluster's CPUs when None). With
    ``num_workers`` None and no Ray, every local CPU is used, but only when the work is worth Ray's
    start-up: the first targets are fitted here for about :data:`PROBE_SECONDS`, and the rest go to
    Ray when they would take longer than :data:`RAY_START_SECONDS` more here than on Ray. Which
    path ran never changes the result (each target has its own seed).
    """
    n_targets = len(target_columns)
    importances = np.zeros((n_targets, len(regulator_columns)))
    n_trees = np.zeros(n_targets, dtype=np.int64)
    ray_module = sys.modules.get("ray")
    ray_running = ray_module is not None and ray_module.is_initialized()
    workers = num_workers
    first = 0  # targets fitted here before handing the rest to Ray
    if ray_address is None and not ray_running:
        workers = num_workers if num_workers is not None else local_cpu_count()
        budget = None if workers == 1 else (PROBE_SECONDS if num_workers is None else 0.0)
        started = time.perf_counter()
        while first < n_targets and (budget is None or time.perf_counter() - started < budget):
            one = slice(first, first + 1)
            importances[one], n_trees[one] = fit_targets(
                regressor, expression, regulator_columns, target_columns[one], seeds[one]
            )
            first += 1
        if first == n_targets:
            return importances, n_trees, {"workers": 1, "ray": False, "chunks": 0}
        remaining_here = (time.perf_counter() - started) / max(first, 1) * (n_targets - first)
        if num_workers is None and remaining_here * (1 - 1 / workers) < RAY_START_SECONDS:
            tail = slice(first, n_targets)
            importances[tail], n_trees[tail] = fit_targets(
                regressor, expression, regulator_columns, target_columns[tail], seeds[tail]
            )
            return importances, n_trees, {"workers": 1, "ray": False, "chunks": 0}

    import ray

    started_here = not ray.is_initialized()
    if started_here:
        init_ray(ray_address, workers, log_to_driver=False)
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        rest = np.arange(first, n_targets)
        n_chunks = max(1, min(len(rest), CHUNKS_PER_WORKER * workers))
        # Round-robin chunks: targets next to each other in gene order often cost alike.
        queue = [rest[start::n_chunks] for start in range(n_chunks)]
        task = ray.remote(num_cpus=1)(_fit_chunk)
        shared = ray.put(expression)
        pending: dict[Any, np.ndarray] = {}
        while queue or pending:
            while queue and len(pending) < workers:
                rows = queue.pop(0)
                reference = task.remote(
                    regressor, shared, regulator_columns, target_columns[rows], seeds[rows]
                )
                pending[reference] = rows
            finished, _ = ray.wait(list(pending), num_returns=1)
            for reference in finished:
                rows = pending.pop(reference)
                importances[rows], n_trees[rows] = ray.get(reference)
    finally:
        if started_here:
            ray.shutdown()
    return importances, n_trees, {"workers": workers, "ray": True, "chunks": n_chunks}


# -- the extractors ---------------------------------------------------------------------------


def read_regulators(tf_list: list[str] | str, where: str) -> list[str]:
    """TF names from a list, a text file (one per line, ``#`` comments) or a CSV/TSV ('TF' column)."""
    if not isinstance(tf_list, str):
        return [str(name) for name in tf_list]
    file = Path(tf_list).expanduser()
    suffixes = [s.lower() for s in file.suffixes if s.lower() not in (".gz", ".bz2", ".xz")]
    if not (suffixes and suffixes[-1] in (".csv", ".tsv") and file.is_file()):
        return read_gene_list(tf_list, where)
    table = pd.read_csv(file, sep="\t" if suffixes[-1] == ".tsv" else ",")
    column = "TF" if "TF" in table.columns else table.columns[0]
    names = [str(name).strip() for name in table[column].dropna()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{where}: tf_list file {tf_list!r} names no TF in its column {column!r}.")
    return names


class TreeRegressionParams(UniverseParams):
    """Parameters GRNBoost2 and GENIE3 share."""

    tf_list: list[str] | str | None = Field(
        None,
        description="candidate regulators: a list of gene ids, or a file (one per line, or a CSV/TSV "
        "with a 'TF' column); TFs absent from the data are ignored; every gene when None",
    )
    n_top_genes: int | None = Field(
        None, ge=2, description="gene universe: the most expressed genes (by mean); all genes when None"
    )
    layer: str | None = Field(
        None, description="expression layer to regress (log-normalised, as arboreto expects); X when None"
    )
    n_estimators: int | None = Field(None, ge=1, description="trees per target; arboreto's default when None")
    top_k: int | None = Field(None, ge=1, description="keep only the best links; all links when None")
    seed: int | None = seed_field("seed of the per-target regressors (each target's derived from it)")


class TreeRegressionExtractor(Extractor):
    """Common driver of the GRNBoost2 and GENIE3 extractors (one module each)."""

    needs: ClassVar[tuple[str, ...]] = ("data", "cells")
    direction: ClassVar[str] = "regulator -> target"
    #: "grnboost2" or "genie3": which arboreto profile to fit.
    method: ClassVar[str]

    genes: list[str] | str | None
    tf_list: list[str] | str | None
    n_top_genes: int | None
    layer: str | None
    n_estimators: int | None
    top_k: int | None
    seed: int | None

    def regressor(self) -> Regressor:
        return arboreto_profile(self.method, self.n_estimators, early_stop_window=25)

    def input_files(self) -> list[Path]:
        files = universe_file(self.genes)
        return files + (universe_file(self.tf_list) if isinstance(self.tf_list, str) else [])

    def _who(self) -> str:
        return f"extractor {self.name!r}"

    def expression(self, context: RunContext) -> tuple[np.ndarray, list[str]]:
        """The dense cells x universe matrix (the sample's cells) and the universe's gene ids."""
        adata, _ = context.sampled_adata()
        who = self._who()
        if self.layer is not None and self.layer not in adata.layers:
            raise DataError(
                f"{who}: layer {self.layer!r} not found; layers: {', '.join(adata.layers) or 'none'}. "
                "Set params.layer to one of them, or null for X."
            )
        matrix = adata.layers[self.layer] if self.layer is not None else adata.X
        where = f"layer {self.layer!r}" if self.layer is not None else "X"
        if adata.n_obs < 3:
            raise DataError(
                f"{who}: {adata.n_obs} cells; a regression per target needs at least 3 (and many more "
                "to mean anything). Use more cells (a larger sample fraction or no sampler)."
            )
        genes = np.asarray(adata.var_names.astype(str))
        chosen = universe_indices(self.genes, list(genes), who)
        if chosen is None and self.n_top_genes is not None and self.n_top_genes < len(genes):
            means = np.asarray(matrix.mean(axis=0)).ravel()
            chosen = np.sort(np.argsort(-means, kind="stable")[: self.n_top_genes])
        if chosen is not None:
            matrix, genes = matrix[:, chosen], genes[chosen]
        dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
        if dense.dtype not in (np.float32, np.float64):
            dense = dense.astype(np.float64)
        bad = ~np.isfinite(dense)
        if bad.any():
            cells = adata.obs_names[np.unique(np.nonzero(bad)[0])[:3]]
            raise DataError(
                f"{who}: {where} holds {int(bad.sum())} NaN or infinite values (e.g. in cells "
                f"{', '.join(map(repr, map(str, cells)))}); the regressions cannot use them. Drop empty "
                "cells before normalize_total (qc_filter with min_counts: 1), or set params.layer to a "
                "layer without them."
            )
        n_varying = int((np.ptp(dense, axis=0) > 0).sum()) if len(dense) else 0
        if n_varying < 2:
            raise DataError(
                f"{who}: {n_varying} of the {len(genes)} genes of the universe vary across the "
                f"{adata.n_obs} cells of {where}, so no regression can rank regulators. Check that the "
                "data holds expression (an all-zero matrix or a constant layer gives this), or widen the "
                "universe (params.genes, params.n_top_genes)."
            )
        return dense, list(genes)

    def regulator_columns(self, genes: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """Columns of the universe that may regulate, and counts describing the TF list."""
        if self.tf_list is None:
            return np.arange(len(genes)), {}
        who = self._who()
        names = read_regulators(self.tf_list, who)
        wanted = set(names)
        columns = np.array([i for i, gene in enumerate(genes) if gene in wanted], dtype=np.int64)
        if len(columns) == 0:
            listed = ", ".join(map(repr, names[:3]))
            raise DataError(
                f"{who}: none of the {len(wanted)} TFs of params.tf_list (e.g. {listed}) is among the "
                f"{len(genes)} genes of the universe (e.g. {', '.join(map(repr, list(genes)[:3]))}). "
                "Use the data's gene ids (var_names; case matters: mouse genes are 'Sox2', not 'SOX2'), "
                "map symbols with the map_gene_ids preprocessor, or widen the universe."
            )
        if len(genes) == len(columns) == 1:
            raise DataError(f"{who}: the only gene is the only TF; a target needs another regulator.")
        return columns, {"tf_listed": len(wanted), "tf_in_universe": len(columns)}

    def base_seed(self, context: RunContext) -> int:
        # A recipe fills ``seed`` at validation; outside one, the same stream it would use.
        return self.seed if self.seed is not None else derive_seed(context.seed, f"extractors/{self.name}")

    def extract(self, context: RunContext) -> Interactions:
        expression, genes = self.expression(context)
        regulator_columns, tf_info = self.regulator_columns(genes)
        target_columns = np.arange(len(genes))
        base = self.base_seed(context)
        seeds = np.array([target_seed(base, gene) for gene in genes], dtype=np.int64)
        # How the work ran (workers, chunks) is left out of the result: it never changes it.
        importances, n_trees, _ = run_regressions(
            self.regressor(),
            expression,
            regulator_columns,
            target_columns,
            seeds,
            num_workers=context.execute.num_workers,
            ray_address=context.execute.ray_address,
        )
        target_rows, regulator_positions = np.nonzero(importances > 0)
        if len(target_rows) == 0:
            raise DataError(
                f"{self._who()}: every importance is 0 (no regulator explains any target in the "
                f"{expression.shape[0]} cells), so there is nothing to rank. Use more cells or genes."
            )
        scores = importances[target_rows, regulator_positions]
        if self.top_k is not None and self.top_k < len(scores):
            kept = np.sort(np.argpartition(-scores, self.top_k - 1)[: self.top_k])
            target_rows, regulator_positions, scores = (
                target_rows[kept],
                regulator_positions[kept],
                scores[kept],
            )
        names = np.asarray(genes, dtype=object)
        table = pd.DataFrame(
            {
                "source": names[regulator_columns[regulator_positions]],
                "target": names[target_columns[target_rows]],
                "score": scores,
            }
        )
        fitted = n_trees > 0
        metadata = {
            "method": self.method,
            "n_regulators": len(regulator_columns),
            "n_targets": len(target_columns),
            "n_targets_fitted": int(fitted.sum()),
            "mean_trees_per_target": float(n_trees[fitted].mean()) if fitted.any() else 0.0,
            "seed": base,
            **tf_info,
        }
        return Interactions(table, directed=True, extractor=self.name, genes=genes, metadata=metadata)
