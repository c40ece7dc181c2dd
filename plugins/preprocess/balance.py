"""Undersample every class to the size of the smallest (optionally within each cell type)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.components import role_field, seed_field
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import obs_subset, require_obs, require_role, seed_or_zero

if TYPE_CHECKING:
    import anndata


class Balance(Preprocessor):
    """Random undersampling so each label has the same number of cells.

    Per stratum (each cell type when ``cell_type_key`` is set, else all cells), every label keeps
    ``n_per_class`` cells, or as many as its smallest label has when None (a label with fewer
    cells keeps all of them). With ``apply_to: train`` only the cells whose ``obs[split_key]`` is
    "train" are undersampled and the others are kept, so the test set keeps its natural balance.
    ``label_key`` defaults to the recipe's ``data.label_key``; ``cell_type_key`` does not default
    to ``data.cell_type_key`` (None balances all cells as one stratum). Seeded: the seed picks the
    kept cells, the same seed the same ones; in a recipe it derives from the recipe seed unless
    set, in Python None acts as 0. Cell order is preserved. Class sizes before and after go to
    ``uns["balance"]``.
    """

    name = "balance"
    description = "Undersample each label to equal size, optionally per cell type and only in train."
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    writes = ("uns/balance",)

    class Params(ComponentParams):
        label_key: str | None = role_field("label_key", "obs column of the class label")
        cell_type_key: str | None = Field(
            None, description="balance within each value of this obs column; all cells as one when None"
        )
        n_per_class: int | None = Field(
            None, ge=1, description="cells kept per label; the smallest label's size when None"
        )
        apply_to: str | None = Field(
            None, description="only undersample cells with this obs[split_key] value (e.g. train)"
        )
        split_key: str = Field("split", description="obs column holding the split (for apply_to)")
        seed: int | None = seed_field("random seed of the undersampling")

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        labels = require_role(adata, self, "label_key").astype(str).to_numpy()
        strata = (
            require_obs(adata, self.cell_type_key, self.name, "cell_type_key").astype(str).to_numpy()
            if self.cell_type_key is not None
            else np.full(adata.n_obs, "all")
        )
        target = np.ones(adata.n_obs, dtype=bool)
        if self.apply_to is not None:
            split = require_obs(adata, self.split_key, self.name, "split_key").astype(str).to_numpy()
            target = split == self.apply_to
            if not target.any():
                raise DataError(
                    f"preprocessor 'balance': no cell has obs[{self.split_key!r}] == {self.apply_to!r} "
                    f"(values: {', '.join(pd.unique(split)[:10])})."
                )
        rng = np.random.default_rng(seed_or_zero(self.seed))
        keep = ~target
        before = pd.crosstab(strata[target], labels[target])
        for stratum in sorted(pd.unique(strata[target])):
            in_stratum = target & (strata == stratum)
            classes = sorted(pd.unique(labels[in_stratum]))
            sizes = {c: int((in_stratum & (labels == c)).sum()) for c in classes}
            n_keep = self.n_per_class if self.n_per_class is not None else min(sizes.values())
            for label in classes:
                rows = np.flatnonzero(in_stratum & (labels == label))
                chosen = rows if len(rows) <= n_keep else rng.choice(rows, size=n_keep, replace=False)
                keep[chosen] = True
        after = pd.crosstab(strata[keep & target], labels[keep & target])
        summary = {
            "n_cells_in": int(adata.n_obs),
            "n_cells_out": int(keep.sum()),
            "before": {f"{s}|{c}": int(before.loc[s, c]) for s in before.index for c in before.columns},
            "after": {f"{s}|{c}": int(after.loc[s, c]) for s in after.index for c in after.columns},
        }
        adata = obs_subset(adata, keep)
        adata.uns["balance"] = summary
        return adata
