"""expression_scaled against a brute-force per-cell construction of CelluFormer's input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from grnx_core import DataError
from grnx_plugins.tokenizers.expression_scaled import ExpressionScaled


def reference_cells(dense: np.ndarray, max_length: int, offset: int = 1):
    """Per cell: (gene index + offset, value) of expressed genes; over max_length, the largest
    values win (ties: the earlier gene); listed in gene order."""
    cells = []
    for row in dense:
        expressed = [(j, float(np.float32(x))) for j, x in enumerate(row) if x != 0]
        if len(expressed) > max_length:
            kept = sorted(expressed, key=lambda item: (-item[1], item[0]))[:max_length]
            expressed = sorted(kept)
        cells.append(([j + offset for j, _ in expressed], [x for _, x in expressed]))
    return cells


@pytest.fixture(scope="module")
def normalised(pbmc3k):
    import scanpy as sc

    adata = pbmc3k.copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=10_000)
    sc.pp.log1p(adata)
    return adata


def test_matches_brute_force_with_truncation(normalised):
    out = ExpressionScaled(max_length=300).fit(normalised).transform(normalised, obs_columns=["cell_type"])
    expected = reference_cells(normalised.X.toarray(), 300)
    assert out.n_cells == normalised.n_obs
    for i, (ids, values) in enumerate(expected):
        got_ids, got_values = out.cell(i)
        assert got_ids.tolist() == ids
        np.testing.assert_array_equal(got_values, np.array(values, dtype=np.float32))
    n_expressed = np.diff(normalised.X.indptr)
    assert out.metadata["n_cells_truncated"] == int((n_expressed > 300).sum()) > 0
    assert out.vocabulary[0] == "<pad>" and out.vocabulary[1:] == list(normalised.var_names)
    # Padding: id 0, value 0, masked out.
    ids, values, mask = out.padded(np.arange(5))
    assert (ids[~mask] == 0).all() and (values[~mask] == 0).all() and (mask.sum(1) == out.lengths[:5]).all()


def test_ties_at_the_cut_keep_the_earlier_gene_and_layer_is_read():
    counts = sp.csr_matrix(np.array([[0, 2, 1, 2, 2, 0, 3], [1, 1, 1, 1, 1, 1, 1]], dtype=np.float32))
    adata = ad.AnnData(sp.csr_matrix(counts.shape, dtype=np.float32), layers={"norm": counts})
    out = ExpressionScaled(max_length=3, layer="norm", offset=2).transform(adata)
    # Row 0: values 3 (gene 6) and 2 (genes 1, 3, 4): the first two 2s win.
    assert out.cell(0)[0].tolist() == [3, 5, 8] and out.cell(0)[1].tolist() == [2, 2, 3]
    assert out.cell(1)[0].tolist() == [2, 3, 4]
    assert out.metadata["special_ids"] == [0, 1] and out.vocabulary[:2] == ["<pad>", "<unused1>"]


def test_fitted_gene_list_fixes_ids_on_new_data(normalised):
    tokenizer = ExpressionScaled(max_length=2000).fit(normalised)
    shuffled_genes = np.random.default_rng(0).permutation(normalised.n_vars)[:700]
    other = normalised[:20, shuffled_genes].copy()
    out = tokenizer.transform(other)
    full = tokenizer.transform(normalised[:20].copy())
    for i in range(20):
        ids, values = out.cell(i)
        full_ids, full_values = full.cell(i)
        kept = np.isin(full_ids - 1, shuffled_genes)
        # Same ids and values for the genes both have (order differs: output is in input column order).
        assert dict(zip(ids.tolist(), values.tolist())) == dict(
            zip(full_ids[kept].tolist(), full_values[kept].tolist())
        )


def test_dense_sparse_backed_and_workers_agree(normalised, tmp_path):
    sparse = ExpressionScaled(max_length=250).transform(normalised)
    dense_data = normalised.copy()
    dense_data.X = dense_data.X.toarray()
    dense = ExpressionScaled(max_length=250, chunk_size=17).transform(dense_data)
    dense_data.write_h5ad(tmp_path / "dense.h5ad")
    normalised.write_h5ad(tmp_path / "sparse.h5ad")
    backed = ad.read_h5ad(tmp_path / "sparse.h5ad", backed="r")
    workers = ExpressionScaled(max_length=250, chunk_size=9, n_workers=2).transform(
        backed, path=tmp_path / "tok"
    )
    backed_dense = ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")
    dense_file = ExpressionScaled(max_length=250, chunk_size=50).transform(backed_dense)
    for other in (dense, workers, dense_file):
        np.testing.assert_array_equal(sparse.input_ids, other.input_ids)
        np.testing.assert_array_equal(sparse.values, other.values)
        np.testing.assert_array_equal(sparse.offsets, other.offsets)
    backed.file.close()
    backed_dense.file.close()


def test_negative_values_are_refused(normalised):
    import scanpy as sc

    scaled = normalised.copy()
    sc.pp.scale(scaled)
    with pytest.raises(DataError, match="needs non-negative expression in X.*negative value"):
        ExpressionScaled().transform(scaled)
    with pytest.raises(DataError, match="layer 'missing' is not in the data"):
        ExpressionScaled(layer="missing").transform(normalised)
    renamed = normalised[:, :10].copy()
    renamed.var_names = [f"other{i}" for i in range(10)]
    with pytest.raises(DataError, match="none of the 10 genes"):
        ExpressionScaled().fit(normalised).transform(renamed)
    # Genes of new data are matched by name: a fitted list with repeated names cannot be matched.
    repeated = normalised[:10, :6].copy()
    with pytest.warns(UserWarning, match="names are not unique"):  # anndata's own warning
        repeated.var_names = ["A", "B", "A", "C", "D", "E"]
        reordered = repeated[:, [1, 0, 2, 3, 4, 5]].copy()
    fitted = ExpressionScaled().fit(repeated)
    with pytest.raises(DataError, match="fitted gene list has duplicate names.*var_names_make_unique"):
        fitted.transform(reordered)
