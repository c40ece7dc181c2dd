"""keep_annotated: cells listed in a partial annotation table are kept with its labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from grnx_core.errors import DataError
from grnx_plugins.preprocess.keep_annotated import KeepAnnotated


def test_table_keeps_listed_cells_and_carries_labels(make_adata, tmp_path):
    adata = make_adata()
    listed = adata.obs_names[::3]
    table = pd.DataFrame(
        {
            "barcode": list(listed) + ["not_a_cell"],
            "broad_type": ["Ex"] * len(listed) + ["In"],
            "score": np.arange(len(listed) + 1.0),
        }
    )
    path = tmp_path / "annotation.csv"
    table.to_csv(path, index=False)
    result = KeepAnnotated(table=str(path), columns=["broad_type"])(adata)
    assert list(result.obs_names) == list(listed)
    assert (result.obs["broad_type"] == "Ex").all() and "score" not in result.obs
    assert result.uns["keep_annotated"] == {
        "n_cells_in": 240,
        "n_table_rows_without_cell": 1,
        "n_cells_out": len(listed),
    }


def test_key_keeps_cells_with_a_value(make_adata):
    adata = make_adata()
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[:100, adata.obs.columns.get_loc("cell_type")] = None
    result = KeepAnnotated(key="cell_type")(adata)
    assert result.n_obs == 140 and result.obs["cell_type"].notna().all()


def test_errors(make_adata, tmp_path):
    path = tmp_path / "annotation.tsv"
    pd.DataFrame({"cell": ["x", "y"], "type": ["a", "b"]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(DataError, match="none of the 240 cells is in the annotation table"):
        KeepAnnotated(table=str(path))(make_adata())
    with pytest.raises(DataError, match="has no column 'subtype'"):
        KeepAnnotated(table=str(path), columns=["subtype"])(make_adata())
    with pytest.raises(DataError, match="set 'table'"):
        KeepAnnotated()(make_adata())
