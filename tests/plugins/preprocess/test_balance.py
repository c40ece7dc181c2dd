"""balance: equal class sizes, within cell types, only in train, seeded."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grnx_core.errors import DataError
from grnx_plugins.preprocess.balance import Balance


def test_equal_classes_within_cell_types(make_adata):
    adata = make_adata(n_cells=600)
    before = pd.crosstab(adata.obs["cell_type"], adata.obs["label"])
    result = Balance(label_key="label", cell_type_key="cell_type", seed=2)(adata)
    after = pd.crosstab(result.obs["cell_type"], result.obs["label"])
    np.testing.assert_array_equal(after["AD"], before.min(axis=1))
    np.testing.assert_array_equal(after["control"], before.min(axis=1))
    assert result.obs_names.isin(adata.obs_names).all()
    assert list(result.obs_names) == sorted(result.obs_names, key=list(adata.obs_names).index)


def test_only_train_is_undersampled_and_seeded(make_adata):
    adata = make_adata(n_cells=600)
    adata.obs["split"] = np.where(np.arange(600) < 450, "train", "test")
    result = Balance(label_key="label", apply_to="train", seed=5)(adata.copy())
    same = Balance(label_key="label", apply_to="train", seed=5)(adata.copy())
    assert list(result.obs_names) == list(same.obs_names)
    assert (result.obs["split"] == "test").sum() == 150
    train = result.obs[result.obs["split"] == "train"]["label"].value_counts()
    assert train["AD"] == train["control"] == adata.obs["label"][:450].value_counts().min()


def test_fixed_size_and_errors(make_adata):
    adata = make_adata()
    assert Balance(label_key="label", n_per_class=30)(adata).obs["label"].value_counts().tolist() == [30, 30]
    with pytest.raises(DataError, match="label_key is 'diagnosis'"):
        Balance(label_key="diagnosis")(adata)
    with pytest.raises(DataError, match="split_key is 'split'"):
        Balance(label_key="label", apply_to="train")(adata)
    adata.obs["split"] = "test"
    with pytest.raises(DataError, match="no cell has obs\\['split'\\] == 'train'"):
        Balance(label_key="label", apply_to="train")(adata)


def test_seed_picks_the_cells_and_none_acts_as_zero(make_adata):
    adata = make_adata(n_cells=600)
    kept = {seed: list(Balance(label_key="label", seed=seed)(adata.copy()).obs_names) for seed in (0, 1)}
    assert kept[0] != kept[1]
    assert list(Balance(label_key="label")(adata.copy()).obs_names) == kept[0]


def test_label_key_left_unset_names_the_param_and_the_role(make_adata):
    with pytest.raises(DataError, match=r"needs label_key.*data\.label_key in the recipe"):
        Balance()(make_adata())
