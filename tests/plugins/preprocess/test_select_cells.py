"""select_cells keeps cells by obs values; typos and empty selections are clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from grnx_core.errors import DataError
from grnx_plugins.preprocess.select_cells import SelectCells


def test_where_and_exclude(make_adata):
    adata = make_adata()
    result = SelectCells(where={"cell_type": ["astro", "micro"]}, exclude={"donor": ["donor0"]})(adata)
    expected = adata.obs["cell_type"].isin(["astro", "micro"]) & (adata.obs["donor"] != "donor0")
    assert list(result.obs_names) == list(adata.obs_names[expected.to_numpy()])
    assert list(result.obs["cell_type"].cat.categories) == ["astro", "micro"]
    np.testing.assert_array_equal(result.X.toarray(), adata[expected.to_numpy()].X.toarray())


def test_numbers_from_yaml_match_text_values(make_adata):
    adata = make_adata()
    adata.obs["cogdx"] = np.where(adata.obs["label"] == "AD", "4", "1")
    assert SelectCells(where={"cogdx": [4]})(adata).n_obs == int((adata.obs["label"] == "AD").sum())


def test_errors(make_adata):
    adata = make_adata()
    with pytest.raises(DataError, match=r"lists \['Astro'\], which no cell has.*astro"):
        SelectCells(where={"cell_type": ["Astro"]})(adata)
    with pytest.raises(DataError, match="where.celltype is 'celltype'"):
        SelectCells(where={"celltype": ["astro"]})(adata)
    with pytest.raises(DataError, match="no cell matches all conditions"):
        SelectCells(where={"label": ["AD"]}, exclude={"label": ["AD"]})(adata)
