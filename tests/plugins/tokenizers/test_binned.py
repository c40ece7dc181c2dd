"""binned against a brute-force per-cell scGPT binning (np.quantile + np.digitize, as scGPT's preprocess)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from grnx_core import DataError
from grnx_plugins.tokenizers.binned import Binned


def reference_bins(dense: np.ndarray, col_token: np.ndarray, n_bins: int):
    """scGPT's per-cell binning written out: quantile edges of the non-zero values, then
    np.digitize (left) and np.digitize(right=True) for the range a tied value may take."""
    cells = []
    for row in dense.astype(np.float64):
        idx = [j for j in range(len(row)) if row[j] != 0 and col_token[j] >= 0]
        values = row[idx]
        if len(values) == 0:
            cells.append(([], [], []))
            continue
        edges = np.quantile(values, np.linspace(0, 1, n_bins - 1))
        cells.append(
            (
                col_token[idx].tolist(),
                np.digitize(values, edges).tolist(),
                np.digitize(values, edges, right=True).tolist(),
            )
        )
    return cells


@pytest.fixture(scope="module")
def pbmc(pbmc3k):
    return pbmc3k.copy()


def test_left_binning_matches_numpy_per_cell(pbmc):
    tokenizer = Binned(tie_binning="left", max_length=5000).fit(pbmc)
    out = tokenizer.transform(pbmc, obs_columns=["cell_type"])
    col_token = np.arange(pbmc.n_vars) + 3  # <pad>, <cls>, <eoc>, then the genes in var order
    expected = reference_bins(pbmc.X.toarray(), col_token, 51)
    for i, (tokens, left, _) in enumerate(expected):
        ids, values = out.cell(i)
        assert ids[0] == 1 and values[0] == 0  # <cls> with value 0
        assert ids[1:].tolist() == tokens
        assert values[1:].astype(int).tolist() == left
    assert out.values[out.input_ids != 1].min() >= 1 and out.values.max() <= 50
    assert out.metadata["pad_value"] == -2 and out.metadata["mask_value"] == -1
    _, values, mask = out.padded(
        np.arange(4), pad_id=out.metadata["pad_id"], pad_value=out.metadata["pad_value"]
    )
    assert (values[~mask] == -2).all()


def test_spread_ties_stay_in_their_range_and_are_deterministic(pbmc, tmp_path):
    spread = Binned(max_length=5000).transform(pbmc)
    col_token = np.arange(pbmc.n_vars) + 3
    expected = reference_bins(pbmc.X.toarray(), col_token, 51)
    n_tied = n_moved = 0
    spread_digits = []
    for i, (tokens, left, right) in enumerate(expected):
        ids, values = spread.cell(i)
        digits = values[1:].astype(int)
        left, right = np.array(left), np.array(right)
        assert ids[1:].tolist() == tokens
        tied = right < left
        # scGPT's _digitize(side="both"): ceil(u * (right - left) + left) lies in right+1..left.
        assert (digits[~tied] == left[~tied]).all()
        assert ((digits[tied] > right[tied]) & (digits[tied] <= left[tied])).all()
        n_tied += int(tied.sum())
        n_moved += int((digits[tied] != left[tied]).sum())
        spread_digits.append(digits)
    assert n_tied > 1000 and n_moved > 0.5 * n_tied  # counts have many values equal to several edges
    # The same cells give the same bins whatever the chunking, workers, or other cells around them.
    again = Binned(max_length=5000, chunk_size=13, n_workers=2).transform(pbmc)
    np.testing.assert_array_equal(again.values, spread.values)
    order = np.array([150, 3, 77])
    subset = Binned(max_length=5000).fit(pbmc).transform(pbmc[order].copy())
    np.testing.assert_array_equal(subset.values, spread.subset(order).values)
    other_seed = Binned(max_length=5000, seed=1).transform(pbmc)
    assert not np.array_equal(other_seed.values, spread.values)


def test_truncation_random_subset_or_highest(pbmc):
    full = Binned(tie_binning="left", max_length=5000).transform(pbmc)
    random = Binned(tie_binning="left", max_length=101).transform(pbmc)
    highest = Binned(tie_binning="left", max_length=101, truncation="highest").transform(pbmc)
    dense = pbmc.X.toarray()
    n_truncated = 0
    for i in range(pbmc.n_obs):
        full_ids, full_values = full.cell(i)
        lookup = dict(zip(full_ids.tolist(), full_values.tolist()))
        for out in (random, highest):
            ids, values = out.cell(i)
            assert len(ids) == min(101, len(full_ids)) and ids[0] == 1
            assert np.all(np.diff(ids[1:]) > 0)  # kept genes stay in gene order
            assert all(lookup[t] == v for t, v in zip(ids.tolist(), values.tolist()))  # binned before cutting
        if len(full_ids) > 101:
            n_truncated += 1
            genes = full_ids[1:] - 3
            order = sorted(range(len(genes)), key=lambda k: (-dense[i, genes[k]], k))[:100]
            assert highest.cell(i)[0][1:].tolist() == sorted(full_ids[1:][order].tolist())
            assert random.cell(i)[0].tolist() != highest.cell(i)[0].tolist()
    assert n_truncated > 50 and random.metadata["n_cells_truncated"] == n_truncated


def test_checkpoint_vocabulary(pbmc, tmp_path):
    adata = pbmc[:30].copy()
    adata.var["symbol"] = [f"SYM{i}" for i in range(adata.n_vars)]
    vocab = {"<pad>": 60000, "<cls>": 60001, "<eoc>": 60002}
    vocab.update({f"SYM{i}": 5 * i + 7 for i in range(0, adata.n_vars, 2)})  # every other gene
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    out = Binned(vocab_path=str(tmp_path), gene_key="symbol", tie_binning="left").fit(adata).transform(adata)
    col_token = np.array([vocab.get(s, -1) for s in adata.var["symbol"]])
    expected = reference_bins(adata.X.toarray(), col_token, 51)
    for i, (tokens, left, _) in enumerate(expected):
        ids, values = out.cell(i)
        assert ids.tolist() == [60001, *tokens] and values[1:].astype(int).tolist() == left
    assert out.metadata["pad_id"] == 60000 and out.metadata["vocab_size"] == 60003
    assert out.vocabulary[7] == "SYM0" and out.metadata["n_var_in_vocabulary"] == (adata.n_vars + 1) // 2


def test_bad_input(pbmc, tmp_path):
    before = pbmc.copy()
    negative = pbmc[:10].copy()
    negative.X = negative.X.toarray() - 1
    with pytest.raises(DataError, match="needs non-negative expression"):
        Binned().transform(negative)
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "A": 1}))
    with pytest.raises(DataError, match="lacks the special token"):
        Binned(vocab_path=str(tmp_path / "vocab.json")).fit(pbmc)
    (tmp_path / "vocab.json").write_text(json.dumps({"<pad>": 0, "<cls>": 1, "TP53": 2}))
    with pytest.raises(DataError, match="none of the 1000 genes .* set gene_key"):
        Binned(vocab_path=str(tmp_path)).fit(pbmc).transform(pbmc)
    # a refused tokenisation leaves the user's data as it was
    assert (pbmc.X != before.X).nnz == 0 and list(pbmc.var_names) == list(before.var_names)
    pd.testing.assert_frame_equal(pbmc.var, before.var)
    pd.testing.assert_frame_equal(pbmc.obs, before.obs)
    assert pbmc.uns.keys() == before.uns.keys() and pbmc.layers.keys() == before.layers.keys()
