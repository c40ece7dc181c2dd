"""A 10x Genomics Matrix Market folder: matrix.mtx(.gz), genes/features.tsv(.gz), barcodes.tsv(.gz)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pandas as pd
from pydantic import Field

from grnx_core import DataSource
from grnx_core.errors import DataError
from grnx_plugins.data._common import (
    CellMetadataParams,
    attach_source_metadata,
    compression_of,
    existing_path,
    record_source,
    require_unique_cell_names,
    set_counts,
)

if TYPE_CHECKING:
    import anndata

_MATRIX_NAMES = ("matrix.mtx.gz", "matrix.mtx")
_FEATURE_NAMES = ("features.tsv.gz", "genes.tsv.gz", "features.tsv", "genes.tsv")
_BARCODE_NAMES = ("barcodes.tsv.gz", "barcodes.tsv")


def find_file(folder: Path, names: tuple[str, ...], given: str | None, who: str, what: str) -> Path:
    """The file ``given`` (relative to ``folder``), or the first of ``names`` that exists there."""
    if given is not None:
        return existing_path(folder / given, who, what)
    for name in names:
        if (folder / name).is_file():
            return folder / name
    listing = ", ".join(sorted(p.name for p in folder.iterdir())[:20])
    raise DataError(
        f"{who}: no {what} in {folder} (looked for {', '.join(names)}; the folder has {listing}). "
        f"Name the file with the matching parameter."
    )


#: What each line of the two text files holds, for the errors about them.
_LINE_LAYOUT = {
    "genes/features file": "one line per gene: its id, symbol and (Cell Ranger v3) feature type, tab-separated",
    "barcodes file": "one line per cell: its barcode",
}


def read_lines_table(path: Path, who: str, what: str) -> pd.DataFrame:
    """A headerless tab-separated file (plain or compressed, whatever its name), every field as text."""
    layout = _LINE_LAYOUT.get(what, "tab-separated lines")
    try:
        table = pd.read_csv(
            path,
            sep="\t",
            header=None,
            dtype=str,
            quoting=3,
            keep_default_na=False,
            compression=compression_of(path),
        )
    except pd.errors.EmptyDataError:
        table = pd.DataFrame()
    except Exception as error:  # pandas raises many types; the user needs the file name
        raise DataError(
            f"{who}: could not read the {what} {path.name}: {type(error).__name__}: {error}. "
            f"Expected {layout}."
        ) from error
    if table.empty:
        raise DataError(
            f"{who}: the {what} {path.name} is empty; expected {layout}. Copy it again from the "
            f"Cell Ranger output (e.g. filtered_feature_bc_matrix/), or name another file with "
            f"params.{'features' if what.startswith('genes') else 'barcodes'}."
        )
    return table


def read_mtx_folder(
    folder: Path,
    who: str,
    matrix: str | None = None,
    features: str | None = None,
    barcodes: str | None = None,
    var_names: str = "gene_symbols",
    feature_type: str | None = None,
) -> anndata.AnnData:
    """Read one 10x folder into a cells x genes AnnData (float32 CSR, unchecked values)."""
    import anndata as ad
    import scipy.io
    import scipy.sparse as sp

    matrix_path = find_file(folder, _MATRIX_NAMES, matrix, who, "matrix file")
    features_path = find_file(folder, _FEATURE_NAMES, features, who, "genes/features file")
    barcodes_path = find_file(folder, _BARCODE_NAMES, barcodes, who, "barcodes file")
    try:
        counts = scipy.io.mmread(str(matrix_path))
    except Exception as error:
        raise DataError(f"{who}: could not read {matrix_path} as Matrix Market: {error}") from error
    genes = read_lines_table(features_path, who, "genes/features file")
    cells = read_lines_table(barcodes_path, who, "barcodes file")[0].to_numpy()
    require_unique_cell_names(
        pd.Index(cells),
        who,
        barcodes_path.name,
        "Folders of several lanes or samples merged by hand often repeat barcodes: keep the "
        "Cell Ranger suffix (-1, -2, ...) or prefix each barcode with its sample, then load again.",
    )
    counts = sp.csr_matrix(counts)
    n_genes, n_cells = len(genes), len(cells)
    if counts.shape == (n_genes, n_cells):
        counts = sp.csr_matrix(counts.T)
    elif counts.shape != (n_cells, n_genes):
        raise DataError(
            f"{who}: {matrix_path.name} is {counts.shape[0]} x {counts.shape[1]}, but there are "
            f"{n_genes} genes in {features_path.name} and {n_cells} barcodes in {barcodes_path.name}."
        )
    ids = genes[0].to_numpy()
    symbols = genes[1].to_numpy() if genes.shape[1] > 1 else ids
    var = pd.DataFrame({"gene_ids": ids, "gene_symbols": symbols})
    if genes.shape[1] > 2:
        var["feature_types"] = genes[2].to_numpy()
    var.index = pd.Index(var[var_names].astype(str), name=None)
    with warnings.catch_warnings():  # repeated gene names are made unique below, as scanpy does
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(cells, name=None)), var=var)
        if feature_type is not None and "feature_types" in var.columns:
            keep = (var["feature_types"] == feature_type).to_numpy()
            if not keep.any():
                raise DataError(
                    f"{who}: no feature has type {feature_type!r}; types present: "
                    f"{', '.join(var['feature_types'].unique())}."
                )
            adata = adata[:, keep].copy()
        if not adata.var_names.is_unique:
            adata.var_names_make_unique()
    return adata


class TenxMtx(DataSource):
    """Reads a 10x folder (v2 ``genes.tsv`` or v3 ``features.tsv``, plain or gzipped).

    The matrix may be genes x cells (10x's layout) or cells x genes; the orientation is taken from
    the gene and barcode counts. Duplicate gene names are made unique (``-1``, ``-2`` suffixes, as
    scanpy does) and both ids and symbols stay in ``var``; repeated barcodes and empty files are
    refused, and files are read by their content (gzipped or plain, whatever the name). An optional
    per-cell ``metadata`` table is joined on barcode (``obs_names``). Values must be non-negative
    integers; they end in ``layers["counts"]``, with a float32 copy in ``X``.
    """

    name = "10x_mtx"
    description = "10x Genomics Matrix Market folder (matrix.mtx + genes/features + barcodes), plus metadata."
    reference = "https://www.10xgenomics.com/support/software/cell-ranger/latest/analysis/outputs/cr-outputs-mex-matrices"

    class Params(CellMetadataParams):
        path: str = Field(description="folder holding the matrix, features and barcodes files")
        matrix: str | None = Field(
            None, description="matrix file name inside path; matrix.mtx(.gz) when None"
        )
        features: str | None = Field(
            None,
            description="genes/features file name inside path; features.tsv or genes.tsv (.gz) when None",
        )
        barcodes: str | None = Field(
            None, description="barcodes file name inside path; barcodes.tsv(.gz) when None"
        )
        var_names: Literal["gene_symbols", "gene_ids"] = Field(
            "gene_symbols", description="which features column names the genes (ids: e.g. Ensembl)"
        )
        feature_type: str | None = Field(
            "Gene Expression", description="keep only this feature type when the file lists types"
        )

    def input_files(self) -> list[Path]:
        folder = Path(self.path)
        files = [p for p in sorted(folder.iterdir())] if folder.is_dir() else [folder]
        if self.metadata:
            files.append(Path(self.metadata))
        return files

    def obs_columns(self) -> list[str] | None:
        from grnx_plugins.data._obs_columns import metadata_columns, with_name_columns

        return with_name_columns(
            metadata_columns(self.metadata, self.metadata_cell_column), self.obs_from_names
        )

    def load(self) -> anndata.AnnData:
        who = f"data source '10x_mtx' ({self.path})"
        folder = existing_path(self.path, who, "folder")
        if not folder.is_dir():
            raise DataError(f"{who}: path must be a folder holding matrix.mtx, genes and barcodes files.")
        adata = read_mtx_folder(
            folder, who, self.matrix, self.features, self.barcodes, self.var_names, self.feature_type
        )
        set_counts(adata, who)
        adata = attach_source_metadata(adata, self, who)
        record_source(adata, self.name, "layers/counts", path=str(self.path))
        return adata
