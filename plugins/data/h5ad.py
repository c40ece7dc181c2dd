"""An AnnData ``.h5ad`` file (e.g. SEA-AD or ROSMAP), in memory or backed on disk."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from grnx_core import DataSource
from grnx_core.errors import DataError
from grnx_plugins.data._common import (
    CellMetadataParams,
    attach_source_metadata,
    describe_non_counts,
    existing_path,
    is_count_matrix,
    record_source,
    require_finite,
    require_unique_cell_names,
    set_counts,
)

if TYPE_CHECKING:
    import anndata

#: Rows checked for integer counts in backed mode (the whole matrix is never read at load time).
_BACKED_CHECK_ROWS = 2_000


class H5ad(DataSource):
    """Reads an ``.h5ad`` file; raw counts end in ``layers["counts"]`` (``X`` in backed mode).

    Reads ``counts`` (``"X"``, ``"raw"`` for ``adata.raw.X``, or a layer name) and checks that it
    holds non-negative integers. In memory, ``X`` becomes a float32 copy of the counts and
    ``layers["counts"]`` keeps them; other layers and ``raw`` are dropped to save memory. In backed
    mode (``backed: true``) nothing is copied: the counts must be ``X``, stay on disk for streaming
    samplers, and only the first rows are checked. ``uns["grnx_data"]["counts"]`` says where the
    counts are. Repeated cell names (``obs_names``) are refused, as by every file source.
    """

    name = "h5ad"
    description = "AnnData .h5ad file with raw counts in X, raw or a layer; optionally backed on disk."
    reference = "https://doi.org/10.21105/joss.04371"

    class Params(CellMetadataParams):
        path: str = Field(description="path to the .h5ad file (relative to where grnx runs)")
        backed: bool = Field(
            False, description="open read-only backed on disk instead of loading X into memory"
        )
        counts: str = Field(
            "X", description="where the raw integer counts are: 'X', 'raw' (adata.raw.X) or a layer name"
        )
        required_obs: list[str] = Field(
            default_factory=list,
            description="obs columns that must exist after rename_obs and the metadata join (label, donor, ...)",
        )
        rename_obs: dict[str, str] = Field(
            default_factory=dict, description="obs columns to rename, old name -> new name"
        )

    def input_files(self) -> list[Path]:
        files = [Path(self.path)]
        if self.metadata:
            files.append(Path(self.metadata))
        return files

    def obs_columns(self) -> list[str] | None:
        from grnx_plugins.data._obs_columns import h5ad_obs_columns, metadata_columns, with_name_columns

        stored = h5ad_obs_columns(self.path, self.rename_obs)
        joined = metadata_columns(self.metadata, self.metadata_cell_column)
        return (
            None
            if stored is None or joined is None
            else with_name_columns(stored + joined, self.obs_from_names)
        )

    def load(self) -> anndata.AnnData:
        import anndata

        who = f"data source 'h5ad' ({self.path})"
        path = existing_path(self.path, who, "h5ad file")
        try:
            with warnings.catch_warnings():  # repeated names are refused below, with what to do
                warnings.filterwarnings("ignore", message="(Observation|Variable) names are not unique")
                adata = anndata.read_h5ad(path, backed="r" if self.backed else None)
        except Exception as error:
            raise DataError(
                f"{who}: could not read the file as h5ad: {type(error).__name__}: {error}"
            ) from error
        require_unique_cell_names(
            adata.obs_names,
            who,
            "obs_names",
            "Files concatenated from several samples often repeat barcodes: write the file again with "
            "unique names (e.g. anndata.concat(..., index_unique='-') or adata.obs_names_make_unique()).",
        )
        if self.backed:
            adata = self._checked_backed(adata, who)
        else:
            adata = self._counts_in_memory(adata, who)
        if self.rename_obs:
            missing = [old for old in self.rename_obs if old not in adata.obs.columns]
            if missing:
                raise DataError(
                    f"{who}: rename_obs names obs column(s) {missing} that the file lacks; it has "
                    f"{', '.join(map(str, adata.obs.columns[:30]))}."
                )
            adata.obs = adata.obs.rename(columns=self.rename_obs)
        return attach_source_metadata(adata, self, who)

    def _checked_backed(self, adata: anndata.AnnData, who: str) -> anndata.AnnData:
        if self.counts != "X":
            raise DataError(
                f"{who}: backed mode streams X from disk, but counts is {self.counts!r}. Write the "
                f"counts to X of the file, or set backed: false."
            )
        head = adata.X[: min(_BACKED_CHECK_ROWS, adata.n_obs)]
        require_finite(head, who, "X (its first rows)", adata.obs_names, adata.var_names)
        if not is_count_matrix(head):
            raise DataError(
                f"{who}: X should hold raw integer counts, but {describe_non_counts(head, 'its first rows')}."
            )
        record_source(adata, self.name, "X", path=str(self.path), backed=True)
        return adata

    def _counts_in_memory(self, adata: anndata.AnnData, who: str) -> anndata.AnnData:
        import anndata as ad

        if self.counts == "X":
            counts = adata.X
        elif self.counts == "raw":
            if adata.raw is None:
                raise DataError(f"{who}: counts is 'raw' but the file has no .raw. Use 'X' or a layer name.")
            if adata.raw.n_vars != adata.n_vars:
                # .raw often keeps all genes while X holds a subset: take raw's genes.
                adata = ad.AnnData(
                    X=adata.raw.X, obs=adata.obs, var=adata.raw.var, uns=adata.uns, obsm=dict(adata.obsm)
                )
                counts = adata.X
            else:
                counts = adata.raw.X
        elif self.counts in adata.layers:
            counts = adata.layers[self.counts]
        else:
            raise DataError(
                f"{who}: counts is {self.counts!r}, which is neither 'X', 'raw' nor a layer of the file "
                f"(layers: {', '.join(adata.layers.keys()) or 'none'})."
            )
        if counts is None:
            raise DataError(f"{who}: the file has no X matrix; set counts to a layer name.")
        require_finite(counts, who, repr(self.counts), adata.obs_names, adata.var_names)
        if not is_count_matrix(counts):
            raise DataError(
                f"{who}: {self.counts!r} should hold raw integer counts, but "
                f"{describe_non_counts(counts, 'it')}. Set counts to the layer that holds the raw counts "
                f"(layers: {', '.join(adata.layers.keys()) or 'none'})."
            )
        adata.X = counts
        for layer in list(adata.layers.keys()):
            del adata.layers[layer]
        adata.raw = None
        set_counts(adata, who, check=False)
        record_source(adata, self.name, "layers/counts", path=str(self.path), counts_from=self.counts)
        return adata
