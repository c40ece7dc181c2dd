"""CS-CORE co-expression of raw UMI counts (Su et al., Nat Commun 2023), or its difference between two groups."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from grnx_core import DataError, Extractor, Interactions, RunContext
from grnx_plugins.extractors._cscore_irls import CoexpressionFit, fit_coexpression, two_sided_pvalue
from grnx_plugins.extractors._groups import case_control_masks
from grnx_plugins.extractors._universe import UniverseParams, universe_file, universe_indices, universe_name

log = logging.getLogger("grnx")

#: values read at a time when checking the counts and summing depths (backed data stays on disk)
_SCAN_CHUNK_VALUES = 2**24
#: how far from an integer a count may be (CS-CORE's has_non_integer uses sqrt(machine epsilon))
_INTEGER_TOLERANCE = float(np.sqrt(np.finfo(np.float64).eps))


class CscoreExtractor(Extractor):
    """CS-CORE (docs/methods/extractors.md#cs-core) on raw counts over a gene universe, or its case - control difference.

    Model ``x_ij | z_ij ~ Poisson(s_i z_ij)``: the IRLS moment estimates of the mean and variance of
    the underlying expression ``z``, then a weighted moment regression for each pair's covariance
    (see ``_cscore_irls.py`` for the steps and the package conventions kept). The depth ``s_i`` is
    cell i's total count over every gene of the data, never only the universe's; cells without
    counts add nothing to any sum and are left out. The counts are ``params.layer``, else
    ``layers["counts"]`` when present, else ``X``; anything but finite non-negative integers is
    refused. Cell weights of a sampler are not used: each sampled cell counts once.

    Gene universe: ``genes`` (explicit list or file); else the ``n_top_genes`` genes of highest
    mean depth-normalised count ``mean_i(x_ij / s_i)`` (the CS-CORE vignette's rule), over every
    cell of the data (``universe_cells: all``) or the step's cells; else every gene.

    One group: ``score`` is the CS-CORE correlation, ``pvalue`` the package's test of independence
    ``2 * norm.sf(|T|)`` and ``statistic`` its ``T``. Genes whose variance estimate is <= 0 (no
    biological variation beyond Poisson noise, or no counts) score 0 with every gene, as CS-CORE
    sets them; a pair whose ``T`` is undefined has NaN ``statistic`` and ``pvalue``.

    Two groups (``group_key``, ``case``, ``control``): ``score`` is ``rho_case - rho_control``
    (``difference: correlation``, the default) or ``T_case - T_control`` (``difference:
    statistic``; an undefined ``T`` counts 0), with ``rho_case`` and ``rho_control`` as columns.
    Its ``pvalue`` is a Wald test of equal correlations, ``z = (rho_case - rho_control) /
    sqrt(se_case^2 + se_control^2)`` with ``se = 1 / (sigma_j sigma_k sqrt(sum_i s_i^4 / (S_ij
    S_ik)))``, the null standard error of CS-CORE's covariance regression (the denominator of
    ``T``) scaled to a correlation; ``statistic`` is that ``z``. The standard error is the one
    under independence within each group and ignores the error of the variance estimates, so the
    test is approximate away from independence. The package's own ``diff_CSCORE`` instead permutes
    the group labels over donors (100 refits by default), which this extractor does not do.

    Reads ``context.adata`` (every cell, for the ``universe_cells: all`` means) and
    ``context.sample`` (the step's cells).
    """

    name = "cscore"
    description = "Gene pairs ranked by CS-CORE co-expression of raw counts, or by rho(case) - rho(control)."
    reference = "https://doi.org/10.1038/s41467-023-40503-7"
    needs: ClassVar[tuple[str, ...]] = ("data", "cells")
    direction: ClassVar[str] = "undirected"

    class Params(UniverseParams):
        group_key: str | None = Field(
            None, description="obs column that splits the cells; None estimates over all cells"
        )
        case: str | None = Field(None, description="value of group_key for the case group (e.g. AD)")
        control: str | None = Field(None, description="value of group_key for the control group")
        layer: str | None = Field(
            None, description="layer of raw UMI counts; None reads layers['counts'] when present, else X"
        )
        n_top_genes: int | None = Field(
            None,
            ge=2,
            description="gene universe: the genes of highest mean count / depth; all genes when None",
        )
        universe_cells: Literal["all", "sample"] = Field(
            "all",
            description="cells whose means pick the n_top_genes: every cell of the data (the same "
            "pairs for every sample and the reference) or only the step's cells",
        )
        difference: Literal["correlation", "statistic"] = Field(
            "correlation",
            description="two groups: score pairs by rho(case) - rho(control) or by T(case) - T(control)",
        )
        rank_by: Literal["abs", "value"] = Field(
            "abs", description="rank pairs by |score| (sign kept in 'sign') or by the signed score"
        )
        top_k: int | None = Field(None, ge=1, description="keep only the best pairs; all pairs when None")
        n_iter: int = Field(
            10,
            ge=0,
            le=1000,
            description="IRLS bound as CS-CORE's IRLS_par n_iter: at most n_iter + 1 updates",
        )
        eps: float = Field(
            0.05, gt=0, description="IRLS stops when max |log(theta / theta_prev)| is at most this"
        )
        max_memory_gb: float = Field(
            4.0,
            gt=0,
            description="memory for the gene x gene matrices and the working blocks (sets the block size)",
        )

    genes: list[str] | str | None
    group_key: str | None
    case: str | None
    control: str | None
    layer: str | None
    n_top_genes: int | None
    universe_cells: str
    difference: str
    rank_by: str
    top_k: int | None
    n_iter: int
    eps: float
    max_memory_gb: float

    def input_files(self) -> list[Path]:
        return universe_file(self.genes)

    # -- inputs ------------------------------------------------------------------------------

    @property
    def _who(self) -> str:
        return f"extractor {self.name!r}"

    def _layer_name(self, adata: Any) -> str | None:
        """The layer the counts are read from; None for X."""
        if self.layer is not None:
            if self.layer not in adata.layers:
                raise DataError(
                    f"{self._who}: layer {self.layer!r} not found; layers: "
                    f"{', '.join(adata.layers) or 'none'}. Set params.layer to the layer of raw UMI "
                    "counts, or null to read layers['counts'] (else X)."
                )
            return self.layer
        return "counts" if "counts" in adata.layers else None

    @staticmethod
    def _matrix(adata: Any, layer: str | None) -> Any:
        return adata.layers[layer] if layer is not None else adata.X

    @staticmethod
    def _where(layer: str | None) -> str:
        return f"layer {layer!r}" if layer is not None else "X"

    def _scan(self, adata: Any, layer: str | None, with_means: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Check that every value is a count; return each cell's depth and, if asked, mean(x / s)."""
        depth = np.zeros(adata.n_obs)
        normalised = np.zeros(adata.n_vars) if with_means else None
        rows_per_chunk = max(1, _SCAN_CHUNK_VALUES // max(adata.n_vars, 1))
        for start in range(0, adata.n_obs, rows_per_chunk):
            stop = min(start + rows_per_chunk, adata.n_obs)
            chunk = self._matrix(adata[start:stop], layer)
            self._require_counts(chunk, adata, layer, start)
            totals = np.asarray(chunk.sum(axis=1, dtype=np.float64)).ravel()
            depth[start:stop] = totals
            if normalised is not None:
                inverse = np.divide(1.0, totals, out=np.zeros_like(totals), where=totals > 0)
                scaled = (
                    sp.csr_matrix(chunk).multiply(inverse[:, None])
                    if sp.issparse(chunk)
                    else chunk * inverse[:, None]
                )
                normalised += np.asarray(scaled.sum(axis=0, dtype=np.float64)).ravel()
        means = None if normalised is None else normalised / max(int(np.count_nonzero(depth)), 1)
        return depth, means

    def _require_counts(self, chunk: Any, adata: Any, layer: str | None, row_offset: int) -> None:
        """Refuse NaN, infinite, negative or non-integer values, naming the first one found."""
        if sp.issparse(chunk):
            coo = sp.coo_matrix(chunk)
            values: np.ndarray = np.asarray(coo.data)
        else:
            values = np.asarray(chunk).ravel()
        if values.dtype.kind in "iub":
            checks = (("negative", lambda v: v < 0),)
        else:
            checks = (
                ("NaN or infinite", lambda v: ~np.isfinite(v)),
                ("negative", lambda v: v < 0),
                ("non-integer", lambda v: np.abs(v - np.round(v)) > _INTEGER_TOLERANCE),
            )
        for kind, test in checks:
            with np.errstate(invalid="ignore"):
                bad = test(values)
            if not bad.any():
                continue
            first = int(np.flatnonzero(bad)[0])
            if sp.issparse(chunk):
                row, col = int(coo.row[first]), int(coo.col[first])
            else:
                row, col = divmod(first, chunk.shape[1])
            cell, gene = adata.obs_names[row_offset + row], adata.var_names[col]
            raise DataError(
                f"{self._who}: {self._where(layer)} holds {int(bad.sum())} {kind} values in its rows "
                f"{row_offset}..{row_offset + chunk.shape[0] - 1} (e.g. {float(values[first])!r} for gene "
                f"{str(gene)!r} in cell {str(cell)!r}); CS-CORE models raw UMI counts (non-negative "
                "integers). Keep the raw counts in layers['counts'] (data sources and normalize_total "
                "do) and leave params.layer null, or set params.layer to the layer that holds them."
            )

    def _universe(self, context: RunContext, adata: Any, layer: str | None, step_means) -> np.ndarray:
        """Sorted column positions of the gene universe."""
        genes = np.asarray(adata.var_names)
        explicit = universe_indices(self.genes, genes, self._who)
        if explicit is not None:
            return explicit
        if self.n_top_genes is None or self.n_top_genes >= len(genes):
            return np.arange(len(genes))
        if self.universe_cells == "all" and context.sample is not None:
            everything = context.require_adata(self._who)
            _, means = self._scan(everything, self._layer_name(everything), with_means=True)
        else:
            means = step_means
        return np.sort(np.argsort(-means, kind="stable")[: self.n_top_genes])

    # -- estimates ---------------------------------------------------------------------------

    def _fit(
        self, counts: Any, depth: np.ndarray, where: str, held_bytes: float, keep_null_precision: bool
    ) -> CoexpressionFit:
        if counts.shape[0] < 2:
            raise DataError(
                f"{self._who} on {where}: CS-CORE needs at least 2 cells with counts, got {counts.shape[0]}."
            )
        try:
            fit = fit_coexpression(
                counts,
                depth,
                max_memory_bytes=self.max_memory_gb * 2**30 - held_bytes,
                n_iter=self.n_iter,
                eps=self.eps,
                keep_null_precision=keep_null_precision,
            )
        except DataError as error:
            raise DataError(f"{self._who} on {where}: {error}") from None
        n_genes = counts.shape[1]
        n_informative = n_genes - fit.n_negative_variance
        if n_informative < 2:
            raise DataError(
                f"{self._who} on {where}: {n_informative} of the {n_genes} genes has a positive variance "
                "estimate beyond Poisson noise, so every pair would score 0 and the ranking would be "
                "arbitrary. Use more cells or more expressed genes (params.n_top_genes or params.genes)."
            )
        if not fit.moments.converged:
            log.warning(
                "%s on %s: IRLS did not converge after %d iterations (delta %.3g > eps %.3g).",
                self._who,
                where,
                fit.moments.n_iterations,
                fit.moments.delta,
                self.eps,
            )
        return fit

    @staticmethod
    def _rows(counts: Any, rows: np.ndarray) -> Any:
        """The chosen cells' counts, without a copy when every cell is chosen."""
        return counts if rows.all() else counts[rows]

    @staticmethod
    def _fit_info(fit: CoexpressionFit, counts: Any, prefix: str = "") -> dict[str, Any]:
        n_genes = counts.shape[1]
        no_counts = np.asarray(counts.sum(axis=0)).ravel() == 0  # counts are checked >= 0
        return {
            f"{prefix}n_cells": int(counts.shape[0]),
            f"{prefix}irls_iterations": int(fit.moments.n_iterations),
            f"{prefix}irls_converged": bool(fit.moments.converged),
            f"{prefix}n_genes_negative_variance": int(fit.n_negative_variance),
            f"{prefix}n_genes_without_counts": int(no_counts.sum()),
            f"{prefix}fraction_clipped": float(
                (fit.n_clipped_high + fit.n_clipped_low) / max(n_genes * (n_genes - 1) // 2, 1)
            ),
        }

    def scores(
        self, context: RunContext
    ) -> tuple[np.ndarray, list[str], dict[str, Any], dict[str, np.ndarray]]:
        """(score matrix, genes, metadata, matrices for the pvalue and extra columns)."""
        adata, _ = context.sampled_adata()
        layer = self._layer_name(adata)
        depth, step_means = self._scan(adata, layer, with_means=self.n_top_genes is not None)
        keep = self._universe(context, adata, layer, step_means)
        genes = [str(gene) for gene in np.asarray(adata.var_names)[keep]]
        with_counts = depth > 0
        matrix = self._matrix(adata, layer)
        counts = matrix[:, keep] if len(keep) < adata.n_vars else matrix
        if sp.issparse(counts):
            counts = sp.csc_matrix(counts)  # the estimator reads blocks of columns, many times
        where = self._where(layer)
        info: dict[str, Any] = {
            "n_genes": len(genes),
            "universe": universe_name(self.genes, self.universe_cells, len(genes), adata.n_vars),
            "counts": where,
            "n_cells_without_counts": int((~with_counts).sum()),
        }
        if self.group_key is None:
            cells = self._rows(counts, with_counts)
            fit = self._fit(cells, depth[with_counts], where, 0.0, keep_null_precision=False)
            info |= self._fit_info(fit, cells)
            info["pvalue"] = "CS-CORE test of independence, 2 * norm.sf(|T|)"
            return fit.correlation, genes, info, {"pvalue": fit.pvalue, "statistic": fit.statistic}

        key, masks = case_control_masks(context, adata, self.group_key, self.case, self.control, self._who)
        fits: dict[str, CoexpressionFit] = {}
        held = 0.0
        for role, value in (("case", self.case), ("control", self.control)):
            rows = masks[role] & with_counts
            group_where = f"{where} of the {role} group ({key} == {value!r})"
            cells = self._rows(counts, rows)
            fits[role] = self._fit(cells, depth[rows], group_where, held, keep_null_precision=True)
            held += 3 * 8.0 * len(genes) ** 2
            info |= self._fit_info(fits[role], cells, prefix=f"{role}_")
        case, control = fits["case"], fits["control"]
        if self.difference == "correlation":
            score = case.correlation - control.correlation
        else:
            score = np.nan_to_num(case.statistic, nan=0.0) - np.nan_to_num(control.statistic, nan=0.0)
        off_diagonal = ~np.eye(len(genes), dtype=bool)
        if not np.any(score[off_diagonal]):
            raise DataError(
                f"{self._who}: {self.difference}(case) - {self.difference}(control) is 0 for every pair "
                f"(the {self.case!r} and {self.control!r} groups of obs[{key!r}] give the same estimates), "
                "so the ranking would be arbitrary. Check that case and control name different cells."
            )
        z = self._difference_statistic(case, control)
        info["pvalue"] = "Wald test of rho(case) = rho(control) with CS-CORE's null standard errors"
        extra = {
            "pvalue": two_sided_pvalue(z),
            "statistic": z,
            "rho_case": case.correlation,
            "rho_control": control.correlation,
        }
        return score, genes, info, extra

    @staticmethod
    def _difference_statistic(case: CoexpressionFit, control: CoexpressionFit) -> np.ndarray:
        """``(rho_case - rho_control) / sqrt(se_case^2 + se_control^2)``; NaN where a se is undefined."""
        variance = np.zeros_like(case.correlation)
        for fit in (case, control):
            sigma2 = fit.moments.sigma2
            valid = np.isfinite(sigma2) & (sigma2 > 0)
            sigma = np.sqrt(np.where(valid, sigma2, np.nan))
            assert fit.null_precision_sqrt is not None
            with np.errstate(divide="ignore", invalid="ignore"):
                se = 1.0 / (fit.null_precision_sqrt * sigma[:, None] * sigma[None, :])
            variance += se * se
        with np.errstate(divide="ignore", invalid="ignore"):
            z = (case.correlation - control.correlation) / np.sqrt(variance)
        z[~np.isfinite(z)] = np.nan
        return z

    def extract(self, context: RunContext) -> Interactions:
        scores, genes, info, extra = self.scores(context)
        interactions = Interactions.from_matrix(
            scores,
            genes,
            directed=False,
            extractor=self.name,
            rank_by=self.rank_by,
            pvalues=extra.pop("pvalue"),
            top_k=self.top_k,
            metadata=info,
        )
        table = interactions.table
        index = pd.Index(genes)
        rows, cols = index.get_indexer(table["source"]), index.get_indexer(table["target"])
        for column, matrix in extra.items():
            table[column] = matrix[rows, cols]
        return interactions
