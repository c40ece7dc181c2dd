"""split: no donor on both sides, stratified by label, seeded; clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grnx_core.errors import DataError
from grnx_plugins.preprocess.split import Split


def donors_on(adata, side):
    return set(adata.obs.loc[adata.obs["split"] == side, "donor"])


def test_donor_level_labels(make_adata):
    adata = make_adata(n_cells=400)
    result = Split(donor_key="donor", label_key="label", test_fraction=0.25, seed=1)(adata)
    train, test = donors_on(result, "train"), donors_on(result, "test")
    assert not train & test and train | test == set(adata.obs["donor"])
    # 4 AD and 4 control donors: round(0.25 * 4) = 1 test donor per label.
    test_labels = (
        result.obs.loc[result.obs["split"] == "test"].groupby("donor", observed=True)["label"].first()
    )
    assert sorted(test_labels) == ["AD", "control"]
    assert result.uns["split"]["stratified_by"] == "donors"
    assert list(result.obs["split"].cat.categories) == ["train", "test"]


def test_a_label_with_one_donor_is_refused(make_adata):
    """A donor-level stratified split cannot put a one-donor label on both sides: refused, not silent."""
    adata = make_adata(n_cells=400)
    ad_donors = sorted(set(adata.obs.loc[adata.obs["label"] == "AD", "donor"]))
    adata = adata[(adata.obs["label"] != "AD") | (adata.obs["donor"] == ad_donors[0])].copy()
    with pytest.raises(DataError, match=f"'AD' has one donor \\('{ad_donors[0]}'\\)"):
        Split(donor_key="donor", label_key="label", test_fraction=0.25, seed=1)(adata)


def test_cell_level_labels_and_seed(make_adata):
    adata = make_adata(n_cells=600)
    adata.obs["donor"] = pd.Categorical(np.array([f"d{i}" for i in range(20)])[np.arange(600) % 20])
    first = Split(donor_key="donor", label_key="cell_type", test_fraction=0.2, seed=3)(adata.copy())
    again = Split(donor_key="donor", label_key="cell_type", test_fraction=0.2, seed=3)(adata.copy())
    other = Split(donor_key="donor", label_key="cell_type", test_fraction=0.2, seed=4)(adata.copy())
    assert not donors_on(first, "train") & donors_on(first, "test")
    np.testing.assert_array_equal(first.obs["split"], again.obs["split"])
    assert donors_on(first, "test") != donors_on(other, "test")
    share = (first.obs["split"] == "test").groupby(first.obs["cell_type"], observed=True).mean()
    assert ((share > 0.1) & (share < 0.3)).all(), share


def test_errors(make_adata):
    adata = make_adata()
    with pytest.raises(DataError, match="donor_key is 'subject'"):
        Split(donor_key="subject")(adata)
    adata.obs["one"] = "d"
    with pytest.raises(DataError, match="at least 2 donors"):
        Split(donor_key="one")(adata)


def test_unstratified_split_follows_the_seed(make_adata):
    adata = make_adata(n_cells=400)
    adata.obs["donor"] = pd.Categorical(np.array([f"d{i}" for i in range(20)])[np.arange(400) % 20])
    tests = {seed: donors_on(Split(donor_key="donor", seed=seed)(adata.copy()), "test") for seed in range(4)}
    assert donors_on(Split(donor_key="donor", seed=2)(adata.copy()), "test") == tests[2]
    assert len({frozenset(t) for t in tests.values()}) > 1


def test_seed_none_acts_as_zero(make_adata):
    adata = make_adata(n_cells=400)
    unset = Split(donor_key="donor", label_key="label")(adata.copy())
    zero = Split(donor_key="donor", label_key="label", seed=0)(adata.copy())
    np.testing.assert_array_equal(unset.obs["split"], zero.obs["split"])


def test_donor_key_left_unset_names_the_param_and_the_role(make_adata):
    with pytest.raises(
        DataError, match=r"needs donor_key.*Set donor_key in the step's params or data\.donor_key"
    ):
        Split()(make_adata())
    with pytest.raises(DataError, match=r"Set donor_key \(or data\.donor_key, which it defaults to\)"):
        Split(donor_key="subject")(make_adata())


def test_cell_unit_splits_cells_stratified_without_a_donor_column(make_adata):
    """unit: cell needs no donor column; about test_fraction of each label's cells go to test."""
    adata = make_adata(n_cells=400)
    del adata.obs["donor"]
    result = Split(unit="cell", label_key="label", test_fraction=0.25, seed=2)(adata)
    share = (result.obs["split"] == "test").groupby(result.obs["label"], observed=True).mean()
    assert np.allclose(share, 0.25, atol=0.01), share
    assert result.uns["split"]["unit"] == "cell" and "test_donors" not in result.uns["split"]
    again = Split(unit="cell", label_key="label", test_fraction=0.25, seed=2)(adata.copy())
    np.testing.assert_array_equal(result.obs["split"], again.obs["split"])
