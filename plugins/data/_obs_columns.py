"""The obs columns a source will give, read without loading its matrix (for recipe validation)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from grnx_plugins.data._common import compression_of, table_separator


def metadata_columns(metadata: str | None, cell_column: str | None) -> list[str] | None:
    """Columns a per-cell metadata table adds (its header, less the cell-name column); [] when
    there is no table, None when its header cannot be read here (the load reports why)."""
    if not metadata:
        return []
    path = Path(metadata).expanduser()
    if not path.is_file():
        return None
    try:
        header = pd.read_csv(path, sep=table_separator(path, None), nrows=0, compression=compression_of(path))
    except Exception:  # the load itself gives the clear error for an unreadable table
        return None
    columns = [str(column) for column in header.columns]
    cell = cell_column if cell_column is not None else (columns[0] if columns else None)
    return [column for column in columns if column != cell]


def h5ad_obs_columns(path: str, rename: dict[str, str]) -> list[str] | None:
    """obs column names stored in an .h5ad file (anndata's ``column-order``), renamed as asked."""
    import h5py

    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        with h5py.File(file, "r") as handle:
            order = handle["obs"].attrs["column-order"]
    except Exception:  # not an h5ad anndata can describe cheaply: leave the check to the load
        return None
    names = [name.decode() if isinstance(name, bytes) else str(name) for name in order]
    return [rename.get(name, name) for name in names]


def with_name_columns(columns: list[str] | None, obs_from_names: dict[str, str]) -> list[str] | None:
    """``columns`` plus those a source reads from the cell names (``obs_from_names``); None stays None."""
    return None if columns is None else [*columns, *obs_from_names]
