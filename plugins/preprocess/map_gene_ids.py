"""Rename genes between symbols and Ensembl IDs with a user table or Geneformer's dictionaries."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.errors import DataError
from grnx_core.safe_pickle import load_plain_pickle
from grnx_plugins.data._common import existing_path, read_table
from grnx_plugins.preprocess._common import require_in_memory

if TYPE_CHECKING:
    import anndata

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+", re.IGNORECASE)


def load_mapping_table(path: str, symbol_column: str, ensembl_column: str, who: str) -> pd.DataFrame:
    """Two columns, ``symbol`` and ``ensembl``, from a TSV/CSV table or a Geneformer ``.pkl`` dict."""
    resolved = existing_path(path, who, "gene id table")
    if resolved.suffix == ".pkl":
        mapping = load_plain_pickle(resolved, what="map_gene_ids gene id table")
        if not isinstance(mapping, dict):
            raise DataError(
                f"{who}: {path} holds a {type(mapping).__name__}, expected a dict symbol -> Ensembl ID."
            )
        keys = [str(k) for k in mapping]
        values = [str(v) for v in mapping.values()]
        # Geneformer's gene_name_id_dict maps symbol -> ID; accept the inverse orientation too.
        if sum(bool(_ENSEMBL.match(k)) for k in keys[:1000]) > sum(
            bool(_ENSEMBL.match(v)) for v in values[:1000]
        ):
            keys, values = values, keys
        return pd.DataFrame({"symbol": keys, "ensembl": values})
    table = read_table(resolved, who, what="gene id table")
    missing = [c for c in (symbol_column, ensembl_column) if c not in table.columns]
    if missing:
        raise DataError(
            f"{who}: gene id table {path!r} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(map(str, table.columns))}. Set symbol_column and ensembl_column."
        )
    table = table[[symbol_column, ensembl_column]].dropna().astype(str)
    return table.set_axis(["symbol", "ensembl"], axis=1)


def aggregate_columns(matrix, groups: np.ndarray, n_groups: int):
    """Sum the columns of ``matrix`` that share a group id (sparse stays sparse)."""
    import scipy.sparse as sp

    summing = sp.csr_matrix(
        (np.ones(len(groups), dtype=np.float32), (np.arange(len(groups)), groups)),
        shape=(len(groups), n_groups),
    )
    if sp.issparse(matrix):
        result = sp.csr_matrix(matrix @ summing)
        return result.astype(matrix.dtype, copy=False)
    return np.asarray(matrix @ summing).astype(np.asarray(matrix).dtype, copy=False)


class MapGeneIds(Preprocessor):
    """Renames ``var_names`` to Ensembl IDs (``to: ensembl``) or symbols (``to: symbol``).

    The table is a CSV/TSV with a symbol and an Ensembl column (Geneformer's
    ``gene_name_id_dict.tsv`` by default column names) or a Geneformer ``.pkl`` dictionary, read
    with a restricted unpickler. IDs are matched exactly, then case-insensitively; Ensembl version
    suffixes (``.12``) are ignored. Genes without a match are dropped (or kept under their old name).
    Several genes mapping to one new id are summed (Geneformer sums counts of IDs that map to the
    same gene) or reduced to the first. The old ids go to ``var["original_id"]``; coverage goes to
    ``uns["map_gene_ids"]`` (genes in, mapped, dropped, merged, fraction of counts kept).
    """

    name = "map_gene_ids"
    description = "Map gene ids symbol <-> Ensembl with a table or Geneformer dictionary; report coverage."
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    writes = ("var_names", "var/original_id", "X", "layers/*", "uns/map_gene_ids")

    class Params(ComponentParams):
        table: str = Field(
            description="CSV/TSV with symbol and Ensembl columns, or a Geneformer .pkl dictionary"
        )
        to: Literal["ensembl", "symbol"] = Field(
            "ensembl", description="the id type var_names should have after"
        )
        symbol_column: str = Field("gene_symbol", description="symbol column of the table")
        ensembl_column: str = Field("ensembl_id", description="Ensembl column of the table")
        from_column: str | None = Field(
            None, description="var column with the ids to map; var_names when None"
        )
        unmapped: Literal["drop", "keep"] = Field(
            "drop", description="genes without a match: drop, or keep their name"
        )
        duplicates: Literal["sum", "first"] = Field(
            "sum", description="several genes mapping to one id: sum them, or keep the first"
        )
        min_coverage: float = Field(
            0.0, ge=0, le=1, description="fail when fewer than this fraction of the genes map"
        )

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        require_in_memory(adata, self.name)
        who = "preprocessor 'map_gene_ids'"
        if self.from_column is not None and self.from_column not in adata.var.columns:
            raise DataError(
                f"{who}: from_column {self.from_column!r} is not a var column (var: "
                f"{', '.join(adata.var.columns) or 'none'})."
            )
        old = (adata.var[self.from_column] if self.from_column else adata.var_names.to_series()).astype(str)
        old = old.to_numpy()
        table = load_mapping_table(self.table, self.symbol_column, self.ensembl_column, who)
        source, target = ("symbol", "ensembl") if self.to == "ensembl" else ("ensembl", "symbol")
        table = table.assign(ensembl=table["ensembl"].str.split(".").str[0].str.upper())
        exact = table.drop_duplicates(source).set_index(source)[target]
        folded = table.assign(key=table[source].str.upper()).drop_duplicates("key").set_index("key")[target]
        query = np.array([o.split(".")[0].upper() if _ENSEMBL.match(o) else o for o in old], dtype=object)
        new = pd.Series(query).map(exact)
        fallback = new.isna()
        new[fallback] = pd.Series(query[fallback.to_numpy()]).str.upper().map(folded).to_numpy()
        mapped = new.notna().to_numpy()
        coverage = float(mapped.mean()) if len(mapped) else 0.0
        if not mapped.any() or coverage < self.min_coverage:
            looks_ensembl = float(np.mean([bool(_ENSEMBL.match(o)) for o in old[:1000]]))
            raise DataError(
                f"{who}: {int(mapped.sum())} of {len(old)} genes ({coverage:.1%}) map to {self.to} with "
                f"{self.table!r} (min_coverage {self.min_coverage:.0%}). Genes look like "
                f"{', '.join(old[:3])} ({looks_ensembl:.0%} Ensembl-like); the table's {source} column looks "
                f"like {', '.join(table[source].iloc[:3])}. Check 'to', the table, and from_column."
            )
        names = np.where(mapped, new.to_numpy(dtype=object), old).astype(str)
        keep = mapped if self.unmapped == "drop" else np.ones(len(old), dtype=bool)
        counts = adata.layers["counts"] if "counts" in adata.layers else None
        total = float(counts.sum()) if counts is not None else None
        kept_total = float(counts[:, keep].sum()) if counts is not None else None
        n_in = adata.n_vars
        adata = adata[:, keep].copy() if not keep.all() else adata
        names, old_kept = names[keep], old[keep]
        codes, uniques = pd.factorize(pd.Series(names))
        n_merged = len(names) - len(uniques)
        if n_merged and self.duplicates == "sum":
            adata = self._summed(adata, codes, np.asarray(uniques, dtype=str), old_kept)
        else:
            first = ~pd.Series(names).duplicated().to_numpy()
            adata = adata[:, first].copy() if not first.all() else adata
            adata.var["original_id"] = old_kept[first]
            adata.var_names = pd.Index(names[first], name=None)
        adata.uns["map_gene_ids"] = {
            "to": self.to,
            "table": str(Path(self.table).name),
            "n_genes_in": int(n_in),
            "n_mapped": int(mapped.sum()),
            "n_unmapped": int((~mapped).sum()),
            "n_dropped": int((~keep).sum()),
            "n_merged": int(n_merged),
            "n_genes_out": int(adata.n_vars),
            "coverage": coverage,
            **(
                {"fraction_of_counts_kept": kept_total / total if total else 1.0} if total is not None else {}
            ),
        }
        return adata

    @staticmethod
    def _summed(
        adata: anndata.AnnData, codes: np.ndarray, names: np.ndarray, old: np.ndarray
    ) -> anndata.AnnData:
        import anndata as ad

        first = pd.Series(codes).drop_duplicates().index.to_numpy()
        var = adata.var.iloc[first].copy()
        var["original_id"] = pd.Series(old).groupby(codes, sort=True).agg("|".join).to_numpy()
        var.index = pd.Index(names, name=None)
        result = ad.AnnData(
            X=aggregate_columns(adata.X, codes, len(names)),
            obs=adata.obs,
            var=var,
            uns=adata.uns,
            obsm=dict(adata.obsm),
            obsp=dict(adata.obsp),
            layers={k: aggregate_columns(v, codes, len(names)) for k, v in adata.layers.items()},
        )
        return result
