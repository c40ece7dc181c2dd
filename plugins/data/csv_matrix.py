"""A dense expression table in CSV/TSV: genes x cells (BEELINE's ExpressionData.csv) or cells x genes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import DataSource
from grnx_core.errors import DataError
from grnx_plugins.data._common import (
    CellMetadataParams,
    attach_source_metadata,
    compression_of,
    existing_path,
    is_count_matrix,
    record_source,
    require_finite,
    require_unique_cell_names,
    set_counts,
    table_separator,
)

if TYPE_CHECKING:
    import anndata


class CsvMatrix(DataSource):
    """Reads a dense table whose first column (or row) names the genes (or cells).

    ``values: counts`` requires non-negative integers and keeps them in ``layers["counts"]``;
    ``values: normalized`` (e.g. BEELINE's log-normalised mDC data, or BoolODE simulations) keeps
    the values in ``X`` with no counts layer; ``auto`` decides by looking at the values.
    ``uns["grnx_data"]["counts"]`` records which happened. A BEELINE ``PseudoTime.csv`` is joined
    onto ``obs`` as ``metadata`` like any per-cell table.
    """

    name = "csv"
    description = "Dense CSV/TSV expression table, genes x cells (BEELINE) or cells x genes, plus metadata."
    reference = "https://doi.org/10.1038/s41592-019-0690-6"

    class Params(CellMetadataParams):
        path: str = Field(description="CSV/TSV file (optionally .gz); the first column holds row names")
        orientation: Literal["genes_x_cells", "cells_x_genes"] = Field(
            "genes_x_cells",
            description="genes_x_cells: one row per gene (BEELINE); cells_x_genes: one row per cell",
        )
        sep: str | None = Field(
            None, description="column separator; from the file suffix when None (.tsv: tab)"
        )
        values: Literal["auto", "counts", "normalized"] = Field(
            "auto",
            description="counts: raw integers (checked); normalized: kept as given; auto: decide from values",
        )

    def input_files(self) -> list[Path]:
        return [Path(p) for p in (self.path, self.metadata) if p]

    def obs_columns(self) -> list[str] | None:
        from grnx_plugins.data._obs_columns import metadata_columns, with_name_columns

        return with_name_columns(
            metadata_columns(self.metadata, self.metadata_cell_column), self.obs_from_names
        )

    def load(self) -> anndata.AnnData:
        import anndata as ad

        who = f"data source 'csv' ({self.path})"
        path = existing_path(self.path, who, "expression table")
        sep, compression = table_separator(path, self.sep), compression_of(path)
        try:
            table = pd.read_csv(path, sep=sep, index_col=0, compression=compression)
            # pandas renames a repeated header name ("c1" -> "c1.1"): take the names as written.
            header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, compression=compression)
        except Exception as error:
            raise DataError(f"{who}: could not read the table: {type(error).__name__}: {error}") from error
        non_numeric = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
        if non_numeric:
            raise DataError(
                f"{who}: expected numbers in every column after the first, but column(s) "
                f"{', '.join(map(str, non_numeric[:5]))} hold text. Is sep right (got "
                f"{table_separator(path, self.sep)!r}), or does the table have extra annotation columns?"
            )
        matrix = table.to_numpy(dtype=np.float64)
        rows, columns = table.index.astype(str), table.columns.astype(str)
        if header.shape[1] == table.shape[1] + 1:
            columns = pd.Index(header.iloc[0, 1:].fillna("").astype(str).to_list())
        if self.orientation == "genes_x_cells":
            matrix, cells, genes = matrix.T, columns, rows
        else:
            cells, genes = rows, columns
        require_finite(matrix, who, "the table", cells, genes)
        with warnings.catch_warnings():  # repeated names are refused or made unique below
            warnings.filterwarnings("ignore", message="(Observation|Variable) names are not unique")
            adata = ad.AnnData(
                X=matrix,
                obs=pd.DataFrame(index=pd.Index(cells, name=None)),
                var=pd.DataFrame(index=pd.Index(genes, name=None)),
            )
        if not adata.var_names.is_unique:
            adata.var_names_make_unique()
        require_unique_cell_names(
            adata.obs_names,
            who,
            "the header line" if self.orientation == "genes_x_cells" else "the first column",
            "Fix the table (or check orientation: genes_x_cells reads the cells from the header line).",
        )
        is_counts = self.values == "counts" or (self.values == "auto" and is_count_matrix(adata.X))
        if is_counts:
            set_counts(adata, who)
        else:
            adata.X = adata.X.astype(np.float32)
        adata = attach_source_metadata(adata, self, who)
        record_source(
            adata,
            self.name,
            "layers/counts" if is_counts else None,
            path=str(self.path),
            values="counts" if is_counts else "normalized",
        )
        return adata
