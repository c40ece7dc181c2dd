"""The shared token-model base: its errors name steps that exist."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from grnx_core import DataError, RunContext, TokenizedCells
from grnx_core.components import Kind
from grnx_core.registry import default_registry
from grnx_plugins.models._base import TokenModel


def test_cells_without_tokens_name_a_preprocessor_that_exists():
    """The hint once named 'filter_cells', which no grnx step is."""
    tokens = TokenizedCells(
        np.array([1, 2, 3]),
        np.array([0, 2, 2, 3]),
        pd.DataFrame(index=["a", "b", "c"]),
        vocabulary=["<pad>", "A", "B", "C"],
    )
    with pytest.raises(DataError, match=r"1 cells have no tokens") as raised:
        TokenModel._require_tokens(RunContext(tokens=tokens), "model 'x'")
    step, param = re.search(r"the (\w+) preprocessor with (\w+): 1", str(raised.value)).groups()
    preprocessor = default_registry().get(Kind.PREPROCESSOR, step)
    assert param in preprocessor.Params.model_fields
