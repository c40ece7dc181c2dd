"""ROSMAP-style single-nucleus data: counts per library, joined cell -> batch -> subject -> diagnosis.

The ROSMAP snRNA-seq releases (Synapse; e.g. Mathys et al. 2019, 2023; Green et al. 2023) ship
counts per sequencing library or batch, a table mapping each batch (library) to a subject
(``projid`` / ``individualID``), a clinical table per subject (``cogdx``, ``braaksc``, ``ceradsc``,
``niareagansc``, ...) and a cell-type annotation table that covers only the cells the authors kept.
This source reproduces that chain of joins and stops with a clear message at the first key that does
not match. Column names are parameters because they differ between releases.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, DataSource
from grnx_core.errors import DataError
from grnx_plugins.data._common import (
    carry_annotation,
    describe_non_counts,
    existing_path,
    is_count_matrix,
    read_table,
    record_source,
    require_columns,
    require_finite,
    set_counts,
)
from grnx_plugins.data.tenx_mtx import read_mtx_folder

if TYPE_CHECKING:
    import anndata


def _is_mtx_folder(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("matrix.mtx", "matrix.mtx.gz"))


def _mapping(table: pd.DataFrame, key: str, value: str, who: str, name: str) -> pd.Series:
    """``key -> value`` from a table; a key mapped to two different values is an error."""
    require_columns(table, [key, value], who, name)
    pairs = table[[key, value]].dropna().astype(str).drop_duplicates()
    clashes = pairs[pairs[key].duplicated(keep=False)]
    if len(clashes):
        example = clashes[clashes[key] == clashes[key].iloc[0]]
        raise DataError(
            f"{who}: {name} maps {key!r} {example[key].iloc[0]!r} to several {value!r} values "
            f"({', '.join(example[value])}); each {key} must belong to one {value}."
        )
    return pd.Series(pairs[value].to_numpy(), index=pairs[key].to_numpy())


def _unmatched_error(
    who: str, n: int, total: int, what: str, examples, known, table: str, fix: str
) -> DataError:
    return DataError(
        f"{who}: {n} of {total} cells have a {what} that {table} does not list (e.g. "
        f"{', '.join(map(str, examples[:3]))}; the table has {', '.join(map(str, known[:5]))}"
        f"{', ...' if len(known) > 5 else ''}). {fix}"
    )


class Rosmap(DataSource):
    """Counts plus the ROSMAP metadata chain, written to obs as ``batch``, ``subject``, ``diagnosis``.

    * ``counts``: an ``.h5ad`` file, one 10x folder, or a folder of per-batch ``.h5ad`` files / 10x
      folders. In the per-batch layout the file or folder name is the batch and cell ids become
      ``<barcode>_<batch>`` (``cell_id_format``), since barcodes repeat across libraries.
    * cell -> batch: the per-batch layout, an obs column (``batch_column``) of a single file, or
      a regular expression on the cell id (``batch_from_barcode``, one capture group).
    * batch -> subject: ``batch_table`` (columns ``batch_column``, ``subject_column``).
    * subject -> diagnosis: ``clinical_table`` (columns ``subject_column``, ``diagnosis_column``);
      ``diagnosis_map`` recodes values (e.g. cogdx ``{"1": "Not AD", "4": "AD"}``; unmapped values
      become missing); ``clinical_columns`` are carried as well.
    * cell types: ``annotation_table`` (``annotation_cell_column`` + ``annotation_columns``) covers
      only some cells; the others get missing values. Filter them with ``keep_annotated``.

    ``unmatched: error`` (default) stops at the first level with unknown keys; ``drop`` removes
    those cells and records how many in ``uns["rosmap"]``.
    """

    name = "rosmap"
    description = "ROSMAP-style counts joined cell -> batch -> subject -> diagnosis, plus partial cell types."
    reference = "https://doi.org/10.1038/s41586-019-1195-2"

    class Params(ComponentParams):
        counts: str = Field(
            description="h5ad file, 10x folder, or folder of per-batch h5ad files / 10x folders"
        )
        counts_layer: str = Field(
            "X", description="in h5ad inputs, where raw counts are: 'X' or a layer name"
        )
        batch_column: str = Field("batch", description="batch (library) column: in obs and in batch_table")
        batch_from_barcode: str | None = Field(
            None, description="regex with one group extracting the batch from a cell id (single-file input)"
        )
        cell_id_format: str = Field(
            "{barcode}_{batch}",
            description="cell ids in the per-batch layout (must match the annotation table)",
        )
        batch_table: str = Field(description="table mapping batch -> subject (CSV/TSV)")
        subject_column: str = Field("projid", description="subject column in batch_table and clinical_table")
        clinical_table: str = Field(description="table with one row per subject holding the diagnosis")
        diagnosis_column: str = Field("cogdx", description="diagnosis column in clinical_table")
        diagnosis_map: dict[str, str] | None = Field(
            None, description="recode diagnosis values (as text) to labels; unmapped values become missing"
        )
        clinical_columns: list[str] = Field(
            default_factory=list, description="more clinical_table columns to carry into obs"
        )
        annotation_table: str | None = Field(
            None, description="cell-type annotation table covering some cells"
        )
        annotation_cell_column: str | None = Field(
            None, description="cell id column of annotation_table; the first column when None"
        )
        annotation_columns: list[str] | None = Field(
            None, description="annotation columns to carry into obs; all when None"
        )
        unmatched: Literal["error", "drop"] = Field(
            "error", description="cells whose batch or subject is not in the tables: error or drop them"
        )

    def input_files(self) -> list[Path]:
        root = Path(self.counts)
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        files = [f for f in files if f.is_file()]
        for table in (self.batch_table, self.clinical_table, self.annotation_table):
            if table:
                files.append(Path(table))
        return files

    # -- reading counts -------------------------------------------------------------------------

    def _read_one(self, path: Path, who: str) -> anndata.AnnData:
        import anndata as ad

        if _is_mtx_folder(path):
            return read_mtx_folder(path, who)
        if path.suffix == ".h5ad":
            adata = ad.read_h5ad(path)
            if self.counts_layer != "X":
                if self.counts_layer not in adata.layers:
                    raise DataError(
                        f"{who}: {path.name} has no layer {self.counts_layer!r} (layers: "
                        f"{', '.join(adata.layers) or 'none'})."
                    )
                adata.X = adata.layers[self.counts_layer]
            for layer in list(adata.layers):
                del adata.layers[layer]
            adata.raw = None
            return adata
        raise DataError(
            f"{who}: {path} is neither an .h5ad file nor a 10x folder (matrix.mtx + genes + barcodes)."
        )

    def _read_counts(self, who: str) -> tuple[anndata.AnnData, bool]:
        import anndata as ad

        root = existing_path(self.counts, who, "counts path")
        if root.is_file() or _is_mtx_folder(root):
            return self._read_one(root, who), False
        parts = sorted(p for p in root.iterdir() if p.suffix == ".h5ad" or _is_mtx_folder(p))
        if not parts:
            raise DataError(f"{who}: {root} holds no .h5ad files or 10x folders, one per batch.")
        pieces = []
        for part in parts:
            batch = part.name.removesuffix(".h5ad")
            piece = self._read_one(part, who)
            piece.obs[self.batch_column] = batch
            piece.obs_names = [self.cell_id_format.format(barcode=b, batch=batch) for b in piece.obs_names]
            pieces.append(piece)
        genes = pieces[0].var_names
        for part, piece in zip(parts, pieces):
            if not piece.var_names.equals(genes):
                raise DataError(
                    f"{who}: {part.name} has different genes than {parts[0].name} "
                    f"({piece.n_vars} vs {len(genes)}); every batch must use the same gene list."
                )
        return ad.concat(pieces, join="inner", merge="first"), True

    # -- joins ----------------------------------------------------------------------------------

    def load(self) -> anndata.AnnData:
        who = f"data source 'rosmap' ({self.counts})"
        adata, _ = self._read_counts(who)
        if not adata.obs_names.is_unique:
            raise DataError(f"{who}: cell ids repeat; use the per-batch layout or a unique cell_id_format.")
        require_finite(adata.X, who, "the counts", adata.obs_names, adata.var_names)
        if not is_count_matrix(adata.X):
            raise DataError(f"{who}: counts should be raw integers, but {describe_non_counts(adata.X, 'X')}.")
        set_counts(adata, who, check=False)
        obs = adata.obs
        keep = np.ones(adata.n_obs, dtype=bool)
        report: dict[str, int] = {"n_cells_read": int(adata.n_obs)}

        # cell -> batch
        if self.batch_from_barcode is not None:
            pattern = re.compile(self.batch_from_barcode)
            if pattern.groups != 1:
                raise DataError(
                    f"{who}: batch_from_barcode needs exactly one capture group, got {pattern.groups}."
                )
            found = obs.index.to_series().str.extract(pattern, expand=False)
            if found.isna().any():
                bad = obs.index[found.isna().to_numpy()]
                raise DataError(
                    f"{who}: batch_from_barcode {self.batch_from_barcode!r} does not match {len(bad)} cell ids "
                    f"(e.g. {', '.join(bad[:3])})."
                )
            obs[self.batch_column] = found.to_numpy()
        elif self.batch_column not in obs.columns:
            raise DataError(
                f"{who}: cells have no batch: obs has no column {self.batch_column!r} (obs: "
                f"{', '.join(map(str, obs.columns[:20])) or 'none'}). Set batch_column, batch_from_barcode, "
                f"or give counts as a folder with one file per batch."
            )
        batch = obs[self.batch_column].astype(str)

        # batch -> subject
        batch_table = read_table(self.batch_table, who, what="batch table")
        batch_to_subject = _mapping(
            batch_table, self.batch_column, self.subject_column, who, f"batch table {self.batch_table!r}"
        )
        subject = batch.map(batch_to_subject)
        missing = subject.isna().to_numpy()
        if missing.any():
            if self.unmatched == "error":
                raise _unmatched_error(
                    who,
                    int(missing.sum()),
                    len(obs),
                    f"batch ({self.batch_column})",
                    batch[missing].unique(),
                    batch_to_subject.index,
                    f"batch table {self.batch_table!r}",
                    "Add the batches to the table, fix batch_column, or set unmatched: drop.",
                )
            keep &= ~missing
        report["n_cells_unknown_batch"] = int(missing.sum())

        # subject -> diagnosis (+ clinical columns)
        clinical = read_table(self.clinical_table, who, what="clinical table")
        require_columns(
            clinical,
            [self.subject_column, self.diagnosis_column, *self.clinical_columns],
            who,
            f"clinical table {self.clinical_table!r}",
        )
        clinical = clinical.copy()
        clinical[self.subject_column] = clinical[self.subject_column].astype(str)
        repeated = clinical[self.subject_column][clinical[self.subject_column].duplicated()]
        if len(repeated):
            raise DataError(
                f"{who}: clinical table {self.clinical_table!r} has several rows for subject(s) "
                f"{', '.join(repeated.unique()[:3])}; it needs one row per subject."
            )
        clinical = clinical.set_index(self.subject_column)
        known = subject.isin(clinical.index).to_numpy()
        no_clinical = ~known & ~missing
        if no_clinical.any():
            if self.unmatched == "error":
                raise _unmatched_error(
                    who,
                    int(no_clinical.sum()),
                    len(obs),
                    f"subject ({self.subject_column})",
                    subject[no_clinical].unique(),
                    clinical.index,
                    f"clinical table {self.clinical_table!r}",
                    "Add the subjects, fix subject_column, or set unmatched: drop.",
                )
            keep &= ~no_clinical
        report["n_cells_unknown_subject"] = int(no_clinical.sum())
        diagnosis = subject.map(clinical[self.diagnosis_column].astype(str).str.removesuffix(".0"))
        if self.diagnosis_map is not None:
            diagnosis = diagnosis.map(self.diagnosis_map)
        obs["batch"] = pd.Categorical(batch)
        obs["subject"] = pd.Categorical(subject)
        obs["diagnosis"] = pd.Categorical(diagnosis)
        for column in self.clinical_columns:
            obs[column] = subject.map(clinical[column]).to_numpy()
        report["n_cells_no_diagnosis"] = int(pd.isna(diagnosis.to_numpy()[keep]).sum())

        # partial cell-type annotation
        if self.annotation_table:
            annotated, n_unlisted = carry_annotation(
                obs,
                self.annotation_table,
                self.annotation_cell_column,
                self.annotation_columns,
                who,
                "Fix cell_id_format or annotation_cell_column.",
            )
            report["n_cells_annotated"] = int(annotated[keep].sum())
            report["n_annotation_rows_without_cell"] = n_unlisted
        adata.obs = obs
        if not keep.all():
            adata = adata[keep].copy()
            for column in adata.obs.select_dtypes("category").columns:
                adata.obs[column] = adata.obs[column].cat.remove_unused_categories()
        report["n_cells"] = int(adata.n_obs)
        adata.uns["rosmap"] = report
        record_source(adata, self.name, "layers/counts", path=str(self.counts))
        return adata
