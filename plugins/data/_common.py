"""Helpers shared by the file-based data sources: reading tables, checking counts, joining metadata."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field, field_validator

from grnx_core import ComponentParams
from grnx_core.errors import DataError

if TYPE_CHECKING:
    import anndata

#: Rows checked at a time when testing a matrix for integer values (bounds the temporary memory).
_CHECK_ROWS = 65_536


def existing_path(path: str | Path, who: str, what: str = "file") -> Path:
    """``path`` as a Path, or a DataError saying where it was looked for."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise DataError(
            f"{who}: {what} {str(path)!r} does not exist (looked at {resolved.resolve()}). "
            f"Relative paths are taken from the directory grnx runs in (the repository root for "
            f"the bundled recipes); fix the path in the recipe."
        )
    return resolved


#: Leading bytes of the compressed formats pandas reads, so a file is read by what it holds, not its name.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"PK\x03\x04", "zip"),
)


def compression_of(path: Path) -> str | None:
    """The compression of ``path`` from its first bytes (gzip, bz2, xz, zip), None for plain files.

    A gzipped table named ``.tsv`` (or a plain one named ``.gz``) is common after a download;
    pandas guesses from the name and fails on both.
    """
    with open(path, "rb") as handle:
        head = handle.read(6)
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


#: What reading a damaged compressed file raises (a cut-short gzip, a zip that is not one, ...).
UNREADABLE: tuple[type[Exception], ...] = (OSError, EOFError, ValueError, zipfile.BadZipFile, lzma.LZMAError)


def first_lines(path: Path, n: int | None = 3) -> list[str]:
    """The first ``n`` lines (all when None) of a possibly compressed text file, without line ends.

    Raises one of ``UNREADABLE`` when the file is damaged.
    """
    compression = compression_of(path)
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        raw: IO[bytes]
        if compression == "zip":
            archive = stack.enter_context(zipfile.ZipFile(path))
            names = archive.namelist()
            if not names:
                return lines
            raw = archive.open(names[0])
        else:
            opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(compression or "", open)
            raw = opener(path, "rb")
        text = stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"))
        for line in text:
            lines.append(line.rstrip("\r\n"))
            if n is not None and len(lines) >= n:
                break
    return lines


def table_separator(path: Path, sep: str | None) -> str:
    if sep is not None:
        return sep
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2", ".zip", ".xz")]
    return "\t" if suffixes and suffixes[-1] in (".tsv", ".txt", ".tab") else ","


def read_table(path: str | Path, who: str, sep: str | None = None, what: str = "table") -> pd.DataFrame:
    """A CSV/TSV table (optionally compressed) with every column read as written (no index).

    A header one field shorter than the rows (R's ``write.csv`` without a row-name header, as in
    BEELINE's PseudoTime.csv) makes pandas use the first field as index; it becomes column "index".
    """
    resolved = existing_path(path, who, what)
    try:
        table = pd.read_csv(
            resolved,
            sep=table_separator(resolved, sep),
            low_memory=False,
            compression=compression_of(resolved),
        )
        if not isinstance(table.index, pd.RangeIndex):
            table = table.reset_index()
        return table
    except pd.errors.EmptyDataError as error:
        raise DataError(
            f"{who}: {what} {str(path)!r} is empty; expected a table with a header line. Point the "
            f"parameter at the file that holds the table."
        ) from error
    except Exception as error:  # pandas raises many types; the user needs the file name
        raise DataError(
            f"{who}: could not read {what} {str(path)!r}: {type(error).__name__}: {error}"
        ) from error


def require_columns(table: pd.DataFrame, columns: Sequence[str], who: str, table_name: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(
            f"{who}: {table_name} has no column {', '.join(map(repr, missing))}. "
            f"Its columns are: {', '.join(map(str, table.columns[:30]))}. Set the matching parameter "
            f"to one of them."
        )


def _are_counts(values: np.ndarray) -> bool:
    """Non-negative integers only; NaN and inf are not counts (checked first: np.mod warns on them)."""
    if np.issubdtype(values.dtype, np.integer):
        return bool((values >= 0).all())
    return bool(np.isfinite(values).all() and (values >= 0).all() and (np.mod(values, 1) == 0).all())


def rows_are_integer(matrix, start: int, stop: int) -> bool:
    block = matrix[start:stop]
    values = block.data if sp.issparse(block) else np.asarray(block)
    return values.size == 0 or _are_counts(values)


def is_count_matrix(matrix, max_rows: int | None = None) -> bool:
    """True when every entry (of the first ``max_rows`` rows, when given) is a non-negative integer."""
    n_rows = matrix.shape[0] if max_rows is None else min(max_rows, matrix.shape[0])
    if sp.issparse(matrix) and max_rows is None:
        values = matrix.data
        step = _CHECK_ROWS * 64
        return all(_are_counts(values[start : start + step]) for start in range(0, values.size, step))
    return all(
        rows_are_integer(matrix, start, min(start + _CHECK_ROWS, n_rows))
        for start in range(0, n_rows, _CHECK_ROWS)
    )


def describe_non_counts(matrix, where: str) -> str:
    """A short description of the first entries that are not non-negative integers."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix[: min(matrix.shape[0], 1000)]).ravel()
    with np.errstate(invalid="ignore"):  # NaN and inf are reported, not warned about
        bad = values[~np.isfinite(values) | (values < 0) | (np.mod(values, 1) != 0)][:5]
    return f"{where} holds values such as {', '.join(f'{v:g}' for v in bad)}"


def find_entries(matrix, is_bad) -> tuple[int, tuple[int, int, Any] | None]:
    """How many entries of ``matrix`` ``is_bad`` flags, and the first as (row, column, value).

    ``is_bad`` maps an array of values to a boolean mask; implicit zeros of sparse matrices are
    never passed to it. Dense matrices are read in row blocks to bound the temporary memory.
    """
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        positions = np.flatnonzero(is_bad(csr.data))
        if not len(positions):
            return 0, None
        row = int(np.searchsorted(csr.indptr, positions[0], side="right")) - 1
        return len(positions), (row, int(csr.indices[positions[0]]), csr.data[positions[0]].item())
    n_bad, first = 0, None
    for start in range(0, matrix.shape[0], _CHECK_ROWS):
        block = np.asarray(matrix[start : start + _CHECK_ROWS])
        bad = is_bad(block)
        if bad.any():
            n_bad += int(bad.sum())
            if first is None:
                row, column = np.argwhere(bad)[0]
                first = (start + int(row), int(column), block[row, column].item())
    return n_bad, first


#: What to do about non-finite values read from a file.
FIX_THE_FILE = (
    "Fix the file: a count matrix holds non-negative integers, with 0 where a gene was not detected "
    "(an empty entry of a table reads as NaN)."
)


def require_finite(
    matrix, who: str, where: str, cells: Sequence[str], genes: Sequence[str], fix: str = FIX_THE_FILE
) -> None:
    """Refuse NaN and infinite entries, naming how many and the first cell and gene holding one.

    Sources and preprocessors call this before computing on the values, so the user reads this
    message rather than numpy's RuntimeWarnings followed by a vaguer one.
    """
    if not np.issubdtype(matrix.dtype, np.inexact):
        return  # integers and booleans are always finite
    n_bad, first = find_entries(matrix, lambda values: ~np.isfinite(values))
    if first is None:
        return
    row, column, value = first
    raise DataError(
        f"{who}: {where} holds {n_bad:,} NaN or infinite value{'s' if n_bad != 1 else ''} (the first, "
        f"{value:g}, for cell {str(cells[row])!r} and gene {str(genes[column])!r}); expression values "
        f"must be finite numbers. {fix}"
    )


def to_float32_csr(matrix) -> sp.csr_matrix | np.ndarray:
    """float32 CSR for sparse input, float32 array for dense input (the layout scanpy expects)."""
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix)
        matrix.sum_duplicates()
        return matrix.astype(np.float32, copy=False)
    return np.asarray(matrix, dtype=np.float32)


def set_counts(adata: anndata.AnnData, who: str, check: bool = True) -> None:
    """Make ``X`` float32 and keep a separate copy of the raw counts in ``layers["counts"]``.

    The copy is deliberate: ``sc.pp.normalize_total`` scales float matrices in place, so a layer
    sharing ``X``'s buffer would be normalised with it.
    """
    if check:
        require_finite(adata.X, who, "the matrix", adata.obs_names, adata.var_names)
    if check and not is_count_matrix(adata.X):
        raise DataError(
            f"{who}: the matrix was declared to hold raw counts, but "
            f"{describe_non_counts(adata.X, 'it')}. Point the data source at the raw integer counts "
            f"(a different layer or file), or declare the values as normalised."
        )
    adata.X = to_float32_csr(adata.X)
    adata.layers["counts"] = adata.X.copy()


def record_source(adata: anndata.AnnData, name: str, counts: str | None, **facts) -> None:
    """Provenance under ``uns["grnx_data"]``: which source loaded the data and where the counts are."""
    adata.uns["grnx_data"] = {
        "source": name,
        "counts": counts if counts is not None else "none",
        **{k: v for k, v in facts.items() if v is not None},
    }


def require_unique_cell_names(names: pd.Index, who: str, where: str, hint: str) -> None:
    """Refuse repeated cell names: joins, samples and the cells a stage reads are keyed by name.

    Every file-based source shares this rule (a repeated barcode is two cells under one name, which
    metadata joins and ``obs_names`` lookups would silently conflate).
    """
    if names.is_unique:
        return
    repeated = names[names.duplicated()].unique()
    raise DataError(
        f"{who}: cell names repeat: {len(repeated)} name(s) appear more than once in {where} (e.g. "
        f"{', '.join(map(repr, map(str, repeated[:3])))}); each cell needs a distinct name. {hint}"
    )


def check_required_obs(adata: anndata.AnnData, required: Sequence[str], who: str) -> None:
    missing = [key for key in required if key not in adata.obs.columns]
    if missing:
        raise DataError(
            f"{who}: obs column {', '.join(map(repr, missing))} is required (required_obs) but the "
            f"data has only: {', '.join(map(str, adata.obs.columns[:30])) or 'no obs columns'}. "
            f"Fix the column name, or add the metadata table that holds it."
        )


def join_cell_metadata(
    obs: pd.DataFrame,
    table: pd.DataFrame,
    cell_column: str | None,
    unmatched: str,
    who: str,
    table_name: str,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Join a per-cell table onto ``obs`` by cell id.

    Returns the joined obs and a boolean mask of the cells to keep (all True unless
    ``unmatched="drop"``). ``unmatched="error"`` refuses cells without a row, ``"keep"`` leaves their
    new columns missing. Duplicate ids in the table are always an error: the join would be ambiguous.
    """
    if cell_column is None:
        cell_column = table.columns[0]
    require_columns(table, [cell_column], who, table_name)
    ids = table[cell_column].astype(str)
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        raise DataError(
            f"{who}: {table_name} lists {duplicated.nunique()} cell id(s) more than once in column "
            f"{cell_column!r} (e.g. {', '.join(duplicated.unique()[:3])}); each cell needs one row."
        )
    columns = table.drop(columns=[cell_column])
    columns.index = pd.Index(ids, name=None)
    clashes = [c for c in columns.columns if c in obs.columns]
    if clashes:
        columns = columns.drop(columns=clashes)
    found = obs.index.isin(columns.index)
    n_missing = int((~found).sum())
    if n_missing and unmatched == "error":
        examples = ", ".join(map(str, obs.index[~found][:3]))
        table_examples = ", ".join(map(str, columns.index[:3]))
        raise DataError(
            f"{who}: {n_missing} of {len(obs)} cells have no row in {table_name} (joined on column "
            f"{cell_column!r}); e.g. data cells {examples} vs table ids {table_examples}. Fix the "
            f"cell id column, or set unmatched: drop (remove those cells) or keep (leave their "
            f"metadata empty)."
        )
    if not found.any():
        raise DataError(
            f"{who}: none of the {len(obs)} cells matches an id in column {cell_column!r} of "
            f"{table_name} (data cells look like {', '.join(map(str, obs.index[:3]))}; the table "
            f"has {', '.join(map(str, columns.index[:3]))}). The join key is wrong."
        )
    joined = obs.join(columns, how="left")
    for column in columns.columns:
        if joined[column].dtype == object:
            joined[column] = joined[column].astype("category")
    keep = found if unmatched == "drop" else np.ones(len(obs), dtype=bool)
    return joined, keep


def carry_annotation(
    obs: pd.DataFrame,
    path: str,
    cell_column: str | None,
    columns: Sequence[str] | None,
    who: str,
    hint: str,
) -> tuple[np.ndarray, int]:
    """Copy ``columns`` (all when None) of a partial per-cell annotation table into ``obs``, in place.

    Unlike :func:`join_cell_metadata`, cells the table does not list are expected (they get missing
    values) and the table's columns replace obs columns of the same name. Text columns become
    categorical. Returns the mask of listed cells and the number of table rows naming no cell;
    ``hint`` ends the error raised when no cell is listed.
    """
    table = read_table(path, who, what="annotation table")
    cell_column = cell_column or table.columns[0]
    require_columns(table, [cell_column, *(columns or [])], who, f"annotation table {path!r}")
    ids = table[cell_column].astype(str)
    if ids.duplicated().any():
        raise DataError(
            f"{who}: annotation table lists cell(s) {', '.join(ids[ids.duplicated()].unique()[:3])} "
            f"more than once in {cell_column!r}."
        )
    table = table.set_index(ids).drop(columns=[cell_column])
    listed = obs.index.isin(table.index)
    if not listed.any():
        raise DataError(
            f"{who}: none of the {len(obs)} cells is in the annotation table {path!r} (cells look "
            f"like {', '.join(map(str, obs.index[:3]))}; the table has {', '.join(table.index[:3])}). {hint}"
        )
    for column in columns or list(table.columns):
        values = table[column].reindex(obs.index)
        obs[column] = pd.Categorical(values) if values.dtype == object else values.to_numpy()
    return listed, int((~table.index.isin(obs.index)).sum())


class CellMetadataParams(ComponentParams):
    """The params of a source that joins an optional per-cell table (see :func:`attach_cell_metadata`)."""

    metadata: str | None = Field(
        None, description="optional per-cell table (CSV/TSV) joined on the cell names (ids, barcodes)"
    )
    metadata_cell_column: str | None = Field(
        None, description="column of the metadata table holding the cell names; the first column when None"
    )
    unmatched: Literal["error", "drop", "keep"] = Field(
        "error", description="cells without a metadata row: error, drop them, or keep with empty metadata"
    )
    required_obs: list[str] = Field(
        default_factory=list,
        description="obs columns that must exist after the metadata join (label, donor, ...); checked at load",
    )
    obs_from_names: dict[str, str] = Field(
        default_factory=dict,
        description="obs columns read from the cell names: column -> regular expression with one "
        "capture group, e.g. {library: '_([A-Za-z]+\\d+_[A-Za-z]+\\d+)$'} (a donor or library named "
        "only in the barcodes); every cell must match",
    )

    @field_validator("obs_from_names")
    @classmethod
    def _one_capture_group(cls, patterns: dict[str, str]) -> dict[str, str]:
        for column, pattern in patterns.items():
            try:
                groups = re.compile(pattern).groups
            except re.error as error:
                raise ValueError(
                    f"obs_from_names[{column!r}]: {pattern!r} is not a regular expression ({error})"
                ) from error
            if groups != 1:
                raise ValueError(
                    f"obs_from_names[{column!r}]: {pattern!r} has {groups} capture groups; it needs "
                    "exactly one, the part of the cell name that becomes the value (use (?:...) "
                    "for other groups)"
                )
        return patterns


def attach_cell_metadata(
    adata: anndata.AnnData,
    metadata: str | None,
    cell_column: str | None,
    unmatched: str,
    required_obs: Sequence[str],
    who: str,
    obs_from_names: dict[str, str] | None = None,
) -> anndata.AnnData:
    """Join the optional per-cell table named by a source's ``metadata`` param, drop the cells
    ``unmatched="drop"`` leaves out (backed data is read into memory then), add the columns read
    from the cell names, and check the required obs columns. Returns the AnnData to hand on."""
    if metadata:
        table = read_table(metadata, who, what="metadata table")
        obs, keep = join_cell_metadata(
            adata.obs, table, cell_column, unmatched, who, f"metadata {metadata!r}"
        )
        adata.obs = obs
        if not keep.all():
            adata = adata[keep].to_memory() if adata.isbacked else adata[keep].copy()
    for column, pattern in (obs_from_names or {}).items():
        if column in adata.obs.columns:
            raise DataError(
                f"{who}: obs_from_names would write obs[{column!r}], which the data or its metadata "
                "table already has; give the column read from the cell names another name."
            )
        adata.obs[column] = obs_column_from_names(adata.obs_names, column, pattern, who)
    check_required_obs(adata, required_obs, who)
    return adata


def attach_source_metadata(adata: anndata.AnnData, source: Any, who: str) -> anndata.AnnData:
    """:func:`attach_cell_metadata` with the :class:`CellMetadataParams` of ``source``."""
    return attach_cell_metadata(
        adata,
        source.metadata,
        source.metadata_cell_column,
        source.unmatched,
        source.required_obs,
        who,
        source.obs_from_names,
    )


def obs_column_from_names(names: pd.Index, column: str, pattern: str, who: str) -> pd.Categorical:
    """The capture group of ``pattern`` searched in every cell name; refuses names it misses."""
    found = pd.Series(np.asarray(names, dtype=str)).str.extract(pattern, expand=False)
    missed = found.isna().to_numpy()
    if missed.any():
        examples = ", ".join(map(repr, np.asarray(names)[missed][:3]))
        raise DataError(
            f"{who}: obs_from_names[{column!r}]: {pattern!r} matches no part of {int(missed.sum())} of "
            f"the {len(names)} cell names (e.g. {examples}). Fix the pattern so every name matches "
            f"(names look like {str(names[0])!r}), or drop those cells first."
        )
    return pd.Categorical(found.to_numpy())
