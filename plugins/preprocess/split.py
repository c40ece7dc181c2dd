"""Train/test split by donor, stratified by label, with no donor on both sides."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, Preprocessor
from grnx_core.components import role_field, seed_field
from grnx_core.errors import DataError
from grnx_plugins.preprocess._common import require_obs, require_role, seed_or_zero

if TYPE_CHECKING:
    import anndata


def donor_level_split(donor_labels: pd.Series, test_fraction: float, rng: np.random.Generator) -> set[str]:
    """Test donors: in each label class, ``round(test_fraction * n)`` donors (1..n-1 when n >= 2)."""
    test: set[str] = set()
    for label in sorted(donor_labels.unique(), key=str):
        donors = np.sort(donor_labels.index[donor_labels == label].to_numpy(dtype=str))
        n = len(donors)
        n_test = 0 if n < 2 else min(n - 1, max(1, round(test_fraction * n)))
        test.update(rng.permutation(donors)[:n_test])
    return test


def cell_level_split(table: pd.DataFrame, test_fraction: float, rng: np.random.Generator) -> set[str]:
    """Test donors chosen greedily so each label's test share of cells approaches ``test_fraction``.

    ``table`` is donors x labels with cell counts. Donors are visited largest first (random order
    among equal sizes); a donor goes to test when that lowers the summed squared relative gap
    between test and target cells per label (the idea of scikit-learn's StratifiedGroupKFold).
    """
    target = test_fraction * table.sum(axis=0).to_numpy(dtype=float)
    scale = np.maximum(target, 1.0)
    order = rng.permutation(len(table))
    sizes = table.sum(axis=1).to_numpy()[order]
    order = order[np.argsort(-sizes, kind="stable")]
    test_counts = np.zeros(table.shape[1])
    test: set[str] = set()
    counts = table.to_numpy(dtype=float)
    for row in order:
        before = (((test_counts - target) / scale) ** 2).sum()
        after = (((test_counts + counts[row] - target) / scale) ** 2).sum()
        if after < before and len(test) < len(table) - 1:
            test.add(str(table.index[row]))
            test_counts += counts[row]
    return test


class Split(Preprocessor):
    """Writes ``obs["split"]`` = "train"/"test" with every donor's cells on one side only.

    When every donor has one label (e.g. AD vs control), donors are split per label: about
    ``test_fraction`` of each label's donors go to test (at least one, never all, when a label
    has two or more donors). When labels vary within donors (e.g. cell types), donors are
    assigned greedily so each label's share of test cells approaches ``test_fraction``. Without
    ``label_key`` donors are split at random. ``donor_key`` defaults to the recipe's
    ``data.donor_key``; ``label_key`` does not default to ``data.label_key`` (None keeps the split
    unstratified). Seeded: the same seed gives the same split, another seed usually another one;
    in a recipe the seed derives from the recipe seed unless set, in Python None acts as 0.
    ``uns["split"]`` lists the donors and cell counts of each side and the labels missing from one.
    ``unit: cell`` splits cells, each its own unit (stratified per label), for data with no donors.
    """

    name = "split"
    description = "Donor-aware train/test split stratified by label; writes obs['split']."
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    writes = ("obs/split", "uns/split")

    class Params(ComponentParams):
        donor_key: str | None = role_field(
            "donor_key", "obs column of the donor (subject); no donor is on both sides"
        )
        label_key: str | None = Field(
            None, description="obs column to stratify by; unstratified when None (data.label_key is not used)"
        )
        test_fraction: float = Field(
            0.2, gt=0, lt=1, description="share of donors (or cells per label) in test"
        )
        seed: int | None = seed_field("random seed of the donor assignment")
        unit: Literal["donor", "cell"] = Field(
            "donor",
            description="what is kept whole on one side: a donor (donor_key), or each cell on its own "
            "(data without donors, e.g. a reference atlas; donor_key is then not read)",
        )

    def _unit_name(self) -> str:
        return f"donor of obs[{self.donor_key!r}]" if self.unit == "donor" else "cell (unit: cell)"

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        if self.unit == "cell":
            donors = pd.Series(np.asarray(adata.obs_names, dtype=str), index=adata.obs_names)
        else:
            donors = require_role(adata, self, "donor_key")
        if donors.isna().any():
            raise DataError(
                f"preprocessor 'split': {int(donors.isna().sum())} cells have no donor in obs[{self.donor_key!r}]; "
                f"remove them first (keep_annotated with key: {self.donor_key})."
            )
        donors = donors.astype(str)
        unique = np.sort(donors.unique())
        if len(unique) < 2:
            raise DataError(
                f"preprocessor 'split': a donor-aware split needs at least 2 donors; obs[{self.donor_key!r}] "
                f"has {len(unique)}."
            )
        rng = np.random.default_rng(seed_or_zero(self.seed))
        if self.label_key is None:
            n_test = min(len(unique) - 1, max(1, round(self.test_fraction * len(unique))))
            test = set(rng.permutation(unique)[:n_test])
            stratified = "none"
        else:
            labels = require_obs(adata, self.label_key, self.name, "label_key")
            if labels.isna().any():
                raise DataError(
                    f"preprocessor 'split': {int(labels.isna().sum())} cells have no label in "
                    f"obs[{self.label_key!r}]; remove them first."
                )
            labels = labels.astype(str)
            table = pd.crosstab(donors.to_numpy(), labels.to_numpy())
            if ((table > 0).sum(axis=1) == 1).all():
                donor_labels = table.idxmax(axis=1)
                per_label = donor_labels.value_counts()
                if (per_label < 2).any():
                    alone = per_label.index[per_label < 2]
                    raise DataError(
                        f"preprocessor 'split': each {self._unit_name()} has one {self.label_key} "
                        "(a donor-level split), and "
                        + ", ".join(
                            f"{label!r} has one {self.unit} ({donor_labels.index[donor_labels == label][0]!r})"
                            for label in map(str, alone)
                        )
                        + ", so it would be on one side only and the test set could not score it. "
                        "Give each label two or more donors (more data, or a finer donor column), or "
                        "drop label_key for an unstratified split."
                    )
                test = donor_level_split(donor_labels, self.test_fraction, rng)
                stratified = "donors"
            else:
                test = cell_level_split(table, self.test_fraction, rng)
                stratified = "cells"
        is_test = donors.isin(test).to_numpy()
        adata.obs["split"] = pd.Categorical(np.where(is_test, "test", "train"), categories=["train", "test"])
        summary: dict = {
            "unit": self.unit,
            "stratified_by": stratified,
            "n_train_cells": int((~is_test).sum()),
            "n_test_cells": int(is_test.sum()),
        }
        if self.unit == "donor":  # cells are not listed one by one
            summary |= {
                "donor_key": self.donor_key,
                "train_donors": sorted(set(unique) - test),
                "test_donors": sorted(test),
            }
        if self.label_key is not None:
            per_side = pd.crosstab(labels.to_numpy(), adata.obs["split"].to_numpy())
            per_side = per_side.reindex(columns=["train", "test"], fill_value=0)
            summary["labels_missing_from_test"] = sorted(per_side.index[per_side["test"] == 0].astype(str))
            summary["labels_missing_from_train"] = sorted(per_side.index[per_side["train"] == 0].astype(str))
        adata.uns["split"] = summary
        return adata
