"""Quality control: filter cells by genes, counts and mitochondrial / ribosomal share; genes by cells."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import counts_matrix, obs_subset, require_in_memory

if TYPE_CHECKING:
    import anndata


class QcFilter(Preprocessor):
    """Removes low-quality cells, then rarely detected genes, from the raw counts.

    Order (each criterion is optional):

    1. Per-cell metrics from the raw counts over all genes, with scanpy's
       ``calculate_qc_metrics``: ``obs["n_genes_by_counts"]``, ``obs["total_counts"]``,
       ``obs["pct_counts_mt"]``, ``obs["pct_counts_ribo"]``. An existing ``pct_counts_mt`` /
       ``pct_counts_ribo`` column is used as given (e.g. computed upstream on all genes);
       otherwise mitochondrial and ribosomal genes are found from their names (``mt_prefix``,
       ``ribo_prefixes``; from ``var[gene_symbol_column]`` when var_names are Ensembl IDs).
    2. Cells failing any of min/max genes, min/max counts, max mitochondrial or ribosomal
       percentage are removed together.
    3. Genes detected in fewer than ``min_cells`` of the remaining cells are removed.

    Writes those obs columns, ``obs["n_counts"]`` (= ``total_counts``, Geneformer's name), ``var["mt"]``, ``var["ribo"]``, ``var["n_cells_by_counts"]`` and
    ``uns["qc_filter"]`` (cells and genes removed per criterion). Stops with a DataError, listing
    what each criterion removed, when no cell or no gene would be left.
    """

    name = "qc_filter"
    description = (
        "Filter cells by genes, counts, mito / ribo share and genes by detection (scanpy QC metrics)."
    )
    reference = "https://doi.org/10.15252/msb.20188746"
    writes = (
        "obs/n_genes_by_counts",
        "obs/total_counts",
        "obs/n_counts",
        "obs/pct_counts_mt",
        "obs/pct_counts_ribo",
        "var/mt",
        "var/ribo",
        "var/n_cells_by_counts",
        "uns/qc_filter",
    )

    class Params(ComponentParams):
        min_genes: int | None = Field(
            None, ge=0, description="keep cells with at least this many detected genes"
        )
        max_genes: int | None = Field(
            None, ge=1, description="keep cells with at most this many detected genes"
        )
        min_counts: int | None = Field(None, ge=0, description="keep cells with at least this many counts")
        max_counts: int | None = Field(None, ge=1, description="keep cells with at most this many counts")
        min_cells: int | None = Field(
            None, ge=0, description="keep genes detected in at least this many cells"
        )
        max_pct_mt: float | None = Field(
            None, ge=0, le=100, description="keep cells with at most this % mitochondrial counts"
        )
        max_pct_ribo: float | None = Field(
            None, ge=0, le=100, description="keep cells with at most this % ribosomal counts"
        )
        mt_prefix: str = Field("MT-", description="gene-name prefix of mitochondrial genes (mouse: mt-)")
        ribo_prefixes: list[str] = Field(
            ["RPS", "RPL"], description="gene-name prefixes of ribosomal protein genes"
        )
        gene_symbol_column: str | None = Field(
            None,
            description="var column with gene symbols (when var_names are Ensembl IDs); var_names when None",
        )

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        import scanpy as sc

        require_in_memory(adata, self.name)
        counts = counts_matrix(adata, self.name)
        if self.gene_symbol_column is not None:
            if self.gene_symbol_column not in adata.var.columns:
                raise DataError(
                    f"preprocessor 'qc_filter': gene_symbol_column {self.gene_symbol_column!r} is not a var "
                    f"column (var: {', '.join(adata.var.columns) or 'none'})."
                )
            symbols = adata.var[self.gene_symbol_column].astype(str)
        else:
            symbols = adata.var_names.to_series().astype(str)
        adata.var["mt"] = symbols.str.startswith(self.mt_prefix).to_numpy()
        adata.var["ribo"] = symbols.str.startswith(tuple(self.ribo_prefixes)).to_numpy()
        given = {
            k: adata.obs[k].copy() for k in ("pct_counts_mt", "pct_counts_ribo") if k in adata.obs.columns
        }
        cell_metrics, _ = sc.pp.calculate_qc_metrics(
            sc.AnnData(X=counts, var=adata.var[["mt", "ribo"]]),
            qc_vars=["mt", "ribo"],
            percent_top=None,
            log1p=False,
            inplace=False,
        )
        for column in ("n_genes_by_counts", "total_counts", "pct_counts_mt", "pct_counts_ribo"):
            adata.obs[column] = (
                given[column].to_numpy() if column in given else cell_metrics[column].to_numpy()
            )
        # Geneformer's name for the total over all genes; stays right after genes are removed.
        adata.obs["n_counts"] = adata.obs["total_counts"].to_numpy()
        if self.max_pct_mt is not None and "pct_counts_mt" not in given and not adata.var["mt"].any():
            raise DataError(
                f"preprocessor 'qc_filter': max_pct_mt is set but no gene name starts with {self.mt_prefix!r} "
                f"(genes look like {', '.join(symbols.iloc[:3])}). Set mt_prefix (mouse: 'mt-'), set "
                f"gene_symbol_column when var_names are Ensembl IDs, or drop max_pct_mt if the data has "
                f"no mitochondrial genes."
            )

        obs = adata.obs
        criteria = {
            "min_genes": (self.min_genes, obs["n_genes_by_counts"] >= (self.min_genes or 0)),
            "max_genes": (self.max_genes, obs["n_genes_by_counts"] <= (self.max_genes or np.inf)),
            "min_counts": (self.min_counts, obs["total_counts"] >= (self.min_counts or 0)),
            "max_counts": (self.max_counts, obs["total_counts"] <= (self.max_counts or np.inf)),
            "max_pct_mt": (
                self.max_pct_mt,
                obs["pct_counts_mt"] <= (self.max_pct_mt if self.max_pct_mt is not None else np.inf),
            ),
            "max_pct_ribo": (
                self.max_pct_ribo,
                obs["pct_counts_ribo"] <= (self.max_pct_ribo if self.max_pct_ribo is not None else np.inf),
            ),
        }
        keep_cells = np.ones(adata.n_obs, dtype=bool)
        removed: dict[str, int] = {}
        for name, (value, passes) in criteria.items():
            if value is None:
                continue
            passes = passes.to_numpy()
            removed[f"cells_failing_{name}"] = int((~passes).sum())
            keep_cells &= passes
        n_cells_kept = int(keep_cells.sum())
        if n_cells_kept == 0:
            failing = ", ".join(f"{k.removeprefix('cells_failing_')}={v}" for k, v in removed.items())
            raise DataError(
                f"preprocessor 'qc_filter': no cell passes QC ({adata.n_obs} cells; failing per criterion: "
                f"{failing}). "
                f"Loosen the thresholds; medians are {obs['n_genes_by_counts'].median():.0f} genes, "
                f"{obs['total_counts'].median():.0f} counts, {obs['pct_counts_mt'].median():.1f}% mito per cell."
            )
        kept_counts = counts[keep_cells] if not keep_cells.all() else counts
        detected = np.asarray((kept_counts > 0).sum(axis=0)).ravel()
        adata.var["n_cells_by_counts"] = detected
        keep_genes = detected >= (self.min_cells or 0)
        removed["genes_below_min_cells"] = int((~keep_genes).sum())
        if not keep_genes.any():
            raise DataError(
                f"preprocessor 'qc_filter': no gene is detected in min_cells={self.min_cells} of the "
                f"{n_cells_kept} cells left; the most detected gene is in {detected.max()} cells. Lower min_cells."
            )
        summary = {
            "n_cells_in": int(adata.n_obs),
            "n_genes_in": int(adata.n_vars),
            "n_cells_out": n_cells_kept,
            "n_genes_out": int(keep_genes.sum()),
            **removed,
        }
        adata = obs_subset(adata, keep_cells)
        if not keep_genes.all():
            adata = adata[:, keep_genes].copy()
        adata.uns["qc_filter"] = summary
        return adata
