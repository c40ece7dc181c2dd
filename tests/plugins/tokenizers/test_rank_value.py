"""rank_value against a brute-force, cell-by-cell computation of Geneformer's rank-value encoding."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from grnx_core import DataError, TokenizedCells
from grnx_plugins.tokenizers._dictionaries import load_dictionary
from grnx_plugins.tokenizers.rank_value import RankValue, exact_nonzero_medians

VERSIONS = {
    "V1": ("v1", "token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict_gc30M"),
    "V2": ("v2", "token_dictionary_gc95M", "gene_median_dictionary_gc95M", "ensembl_mapping_dict_gc95M"),
}


@pytest.fixture(scope="module")
def dictionaries(geneformer_dir: Path) -> dict[str, dict]:
    """The V1 and V2 dictionaries, read from the TSV conversions (independent of the pickle reader)."""
    loaded = {}
    for version, (folder, tokens, medians, mapping) in VERSIONS.items():
        base = geneformer_dir / folder
        loaded[version] = {
            "tokens": load_dictionary(base / f"{tokens}.tsv", "tokens"),
            "medians": load_dictionary(base / f"{medians}.tsv", "medians"),
            "mapping": load_dictionary(base / f"{mapping}.tsv", "mapping"),
        }
    return loaded


def reference_rank_value(adata, tokens, medians, mapping, max_genes, cls_id=None, eos_id=None):
    """Geneformer's formula, one cell and one gene at a time, in plain Python.

    Returns per cell the token list (stable order: equal values keep the column order of the
    gene's first expressed column) and the matching list of scaled values.
    """
    dense = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    ids = [str(i).upper() for i in adata.var_names]
    n_counts = adata.obs["n_counts"].to_numpy() if "n_counts" in adata.obs else None
    cells = []
    for c in range(adata.n_obs):
        row = dense[c]
        total = float(row.sum()) if n_counts is None else float(n_counts[c])
        summed: dict[str, float] = {}
        for j, gene_id in enumerate(ids):
            gene = mapping.get(gene_id) if mapping is not None else gene_id
            if gene is None or gene not in tokens or gene.startswith("<") or gene not in medians:
                continue
            if row[j] != 0:
                summed[gene] = summed.get(gene, 0.0) + float(row[j])
        scaled = [(gene, x / total * 10_000 / medians[gene]) for gene, x in summed.items()]
        ranked = sorted(scaled, key=lambda item: -item[1])[:max_genes]  # sorted() is stable
        cell_tokens = [tokens[g] for g, _ in ranked]
        values = [v for _, v in ranked]
        if cls_id is not None:
            cell_tokens = [cls_id, *cell_tokens, eos_id]
        cells.append((cell_tokens, values))
    return cells


def cells_of(out: TokenizedCells) -> list[list[int]]:
    return [out.cell(i)[0].tolist() for i in range(out.n_cells)]


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_matches_brute_force_on_pbmc3k(pbmc3k, geneformer_dir, dictionaries, version):
    folder = geneformer_dir / VERSIONS[version][0]
    out = (
        RankValue(model_version=version, dictionary_dir=str(folder))
        .fit(pbmc3k)
        .transform(pbmc3k, obs_columns=["cell_type", "donor"])
    )
    d = dictionaries[version]
    special = version == "V2"
    expected = reference_rank_value(
        pbmc3k,
        d["tokens"],
        d["medians"],
        d["mapping"],
        4094 if special else 2048,
        d["tokens"].get("<cls>") if special else None,
        d["tokens"].get("<eos>") if special else None,
    )
    assert out.n_cells == pbmc3k.n_obs
    assert cells_of(out) == [tokens for tokens, _ in expected]
    # Carried columns and metadata.
    pd.testing.assert_frame_equal(out.obs, pbmc3k.obs[["cell_type", "donor"]])
    assert out.metadata["special_ids"] == ([0, 1, 2, 3] if special else [0, 1])
    assert out.vocabulary[out.input_ids[0]] in d["tokens"]
    # 992 (V1) / 984 (V2) of the 1,000 genes have a token in these dictionaries.
    assert out.metadata["n_var_tokenised"] == sum(
        (d["mapping"].get(g.upper()) in d["tokens"]) for g in pbmc3k.var_names
    )


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_equals_geneformer_argsort_outside_ties(pbmc3k, geneformer_dir, dictionaries, version):
    """Geneformer ranks with np.argsort(-v) (quicksort): same tokens except inside tied groups."""
    folder = geneformer_dir / VERSIONS[version][0]
    out = RankValue(model_version=version, dictionary_dir=str(folder), special_tokens=False).transform(pbmc3k)
    d = dictionaries[version]
    token_value = {}
    dense = pbmc3k.X.toarray()
    n_tied = 0
    for c in range(pbmc3k.n_obs):
        genes, values = [], []
        for j, gene_id in enumerate(pbmc3k.var_names):
            gene = d["mapping"].get(gene_id.upper())
            if gene in d["tokens"] and dense[c, j] > 0:
                genes.append(d["tokens"][gene])
                values.append(dense[c, j] / dense[c].sum() * 10_000 / d["medians"][gene])
        values = np.array(values)
        geneformer = np.array(genes)[np.argsort(-values)]
        ours = np.array(out.cell(c)[0])
        token_value = dict(zip(genes, values))
        ours_values = np.array([token_value[t] for t in ours])
        theirs_values = np.array([token_value[t] for t in geneformer])
        np.testing.assert_array_equal(ours_values, theirs_values)
        unique, counts = np.unique(ours_values, return_counts=True)
        singletons = np.isin(ours_values, unique[counts == 1])
        n_tied += int((~singletons).sum())
        np.testing.assert_array_equal(ours[singletons], geneformer[singletons])
    assert n_tied < 0.01 * out.input_ids.size  # medians are distinct floats: ties are rare here


def test_ties_keep_column_order_and_duplicates_are_summed(tmp_path, random_counts):
    """Planted ties (equal medians) and ids that map to one gene (upper-casing and the mapping)."""
    genes = [f"ENSG{i:011d}" for i in range(30)]
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, **{g: i + 4 for i, g in enumerate(genes)}}
    medians = {g: (1.0 if i % 2 else 2.5) for i, g in enumerate(genes)}  # many exactly equal v
    mapping = {g: g for g in genes}
    mapping["ENSG_ALIAS"] = genes[3]  # a second id for gene 3
    (tmp_path / "token_dictionary.json").write_text(pd.Series(tokens).to_json())
    pd.Series(medians).rename_axis("ensembl_id").rename("median").to_csv(
        tmp_path / "gene_median_dictionary.tsv", sep="\t"
    )
    pd.Series(mapping).rename_axis("id").rename("mapped").to_csv(
        tmp_path / "ensembl_mapping_dict.tsv", sep="\t"
    )
    var_names = [
        *genes,
        "ensg_alias",
        genes[5].lower(),
        "ENSG99999999999",
    ]  # alias, lower-case duplicate, unknown
    counts = random_counts(60, len(var_names), 0.5, seed=1, max_count=4)
    adata = ad.AnnData(counts, var=pd.DataFrame(index=var_names))
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    out = RankValue(dictionary_dir=str(tmp_path), model_input_size=20).transform(adata)
    expected = reference_rank_value(adata, tokens, medians, mapping, 18, 2, 3)
    assert cells_of(out) == [t for t, _ in expected]
    assert out.metadata["n_var_summed_into_other_columns"] == 2
    assert out.metadata["n_var_tokenised"] == 32
    # Summing matters: dropping the two extra columns changes the tokens of some cells.
    without = RankValue(dictionary_dir=str(tmp_path), model_input_size=20).transform(adata[:, :30].copy())
    assert cells_of(without) != cells_of(out)
    # The tie structure is real: many cells have equal values inside their first 18 genes.
    assert sum(len(set(v)) < len(v) for _, v in expected) > 30


def test_truncation_and_special_tokens(pbmc3k, geneformer_dir):
    v2 = RankValue(
        model_version="V2", dictionary_dir=str(geneformer_dir / "v2"), model_input_size=64
    ).transform(pbmc3k)
    full = RankValue(model_version="V2", dictionary_dir=str(geneformer_dir / "v2")).transform(pbmc3k)
    for i in range(v2.n_cells):
        ids, full_ids = v2.cell(i)[0], full.cell(i)[0]
        assert ids[0] == 2 and ids[-1] == 3 and len(ids) == min(64, len(full_ids))
        np.testing.assert_array_equal(ids[1:-1], full_ids[1 : len(ids) - 1])  # a prefix of the full ranking
    assert (v2.lengths == 64).sum() == (full.lengths >= 64).sum()
    v1 = RankValue(
        model_version="V1", dictionary_dir=str(geneformer_dir / "v1"), model_input_size=64
    ).transform(pbmc3k)
    assert v1.lengths.max() == 64 and v1.metadata["cls_id"] is None
    assert v1.metadata["model_input_size"] == 64


def test_filter_pass_n_counts_and_empty_cells(pbmc3k, geneformer_dir, tmp_path):
    adata = pbmc3k.copy()
    adata.obs["filter_pass"] = (np.arange(adata.n_obs) % 3 != 0).astype(int)
    X = adata.X.tolil()
    X[5, :] = 0  # an empty cell (kept by filter_pass)
    adata.X = X.tocsr()
    out = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1")).transform(
        adata, obs_columns=["donor"]
    )
    kept = adata.obs_names[(adata.obs["filter_pass"] == 1).to_numpy()].drop(adata.obs_names[5])
    assert list(out.obs.index) == list(kept)
    assert out.metadata["n_cells_filtered_out"] == (adata.obs["filter_pass"] == 0).sum()
    assert out.metadata["n_cells_without_genes"] == 1
    # The same with workers streaming to disk (rows dropped inside the workers' chunks).
    on_disk = RankValue(
        model_version="V1", dictionary_dir=str(geneformer_dir / "v1"), n_workers=2, chunk_size=4
    ).transform(adata, obs_columns=["donor"], path=tmp_path / "tokens")
    np.testing.assert_array_equal(on_disk.input_ids, out.input_ids)
    np.testing.assert_array_equal(on_disk.offsets, out.offsets)
    pd.testing.assert_frame_equal(on_disk.obs, out.obs)
    assert not (tmp_path / "tokens" / "chunks").exists()
    kept_empty = RankValue(
        model_version="V2", dictionary_dir=str(geneformer_dir / "v2"), drop_empty_cells=False
    ).transform(adata)
    assert kept_empty.cell(list(kept_empty.obs.index).index(adata.obs_names[5]))[0].tolist() == [2, 3]


def test_backed_and_in_memory_give_identical_tokens(pbmc3k, geneformer_dir, tmp_path):
    path = tmp_path / "pbmc.h5ad"
    adata = pbmc3k.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # X normalised; the counts layer is read
    adata.write_h5ad(path)
    params = dict(model_version="V2", dictionary_dir=str(geneformer_dir / "v2"))
    memory = RankValue(**params).transform(adata, obs_columns=["cell_type"])
    backed = ad.read_h5ad(path, backed="r")
    streamed = RankValue(**params, chunk_size=7, n_workers=2).transform(
        backed, obs_columns=["cell_type"], path=tmp_path / "tokens"
    )
    np.testing.assert_array_equal(memory.input_ids, streamed.input_ids)
    np.testing.assert_array_equal(memory.offsets, streamed.offsets)
    pd.testing.assert_frame_equal(memory.obs, streamed.obs)
    reloaded = TokenizedCells.load(tmp_path / "tokens")
    np.testing.assert_array_equal(reloaded.input_ids, memory.input_ids)
    # A view of the backed file (cells out of order) gives the same tokens as those cells in memory.
    order = np.array([17, 3, 150, 4, 99])
    view = RankValue(**params, chunk_size=2).transform(backed[order])
    subset = memory.subset(order)
    np.testing.assert_array_equal(view.input_ids, subset.input_ids)
    backed.file.close()


def test_fitted_medians_match_numpy(pbmc3k, geneformer_dir):
    """gene_medians: fit -> np.median of the non-zero normalised values per gene (exact), whether
    the values fit in memory or need the multi-pass narrowing."""
    adata = pbmc3k.copy()
    adata.obs["n_counts"] = np.asarray(adata.X.sum(axis=1)).ravel() * 1.5  # n_counts from obs is used
    small = RankValue(
        model_version="V1",
        dictionary_dir=str(geneformer_dir / "v1"),
        gene_medians="fit",
        median_memory_values=1000,
        chunk_size=33,
    ).fit(adata)
    large = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1"), gene_medians="fit").fit(
        adata
    )
    dense = adata.X.toarray().astype(np.float64)
    n_counts = adata.obs["n_counts"].to_numpy(dtype=np.float64)
    mapping = load_dictionary(geneformer_dir / "v1" / "ensembl_mapping_dict_gc30M.tsv", "m")
    expected = {}
    for j, gene_id in enumerate(adata.var_names):
        gene = mapping.get(gene_id.upper())
        column = dense[:, j]
        if gene is None or gene not in small.dictionaries_["tokens"] or not (column > 0).any():
            continue
        nonzero = column > 0
        expected[gene] = float(np.median(column[nonzero] / n_counts[nonzero] * 10_000))
    assert small.gene_medians_ == expected
    assert large.gene_medians_ == expected
    out = small.transform(adata)
    assert out.metadata["gene_medians"] == "fit" and out.n_cells == adata.n_obs


def test_exact_medians_with_many_equal_values():
    rng = np.random.default_rng(3)
    genes = rng.integers(0, 5, 20_000)
    values = rng.choice([0.5, 1.0, 2.0, 3.0], 20_000) * (1 + (genes == 4) * rng.random(20_000))
    chunks = [(genes[i : i + 999], values[i : i + 999]) for i in range(0, 20_000, 999)]
    medians = exact_nonzero_medians(lambda: iter(chunks), 6, memory_values=1000)
    expected = [np.median(values[genes == g]) for g in range(5)]
    np.testing.assert_array_equal(medians[:5], expected)
    assert np.isnan(medians[5])


def test_pickle_and_tsv_dictionaries_agree(geneformer_dir):
    for folder, *names in VERSIONS.values():
        for name in names:
            base = geneformer_dir / folder / name
            assert load_dictionary(base.with_suffix(".pkl"), "x") == load_dictionary(
                base.with_suffix(".tsv"), "x"
            )


def test_malicious_pickle_is_refused_without_running_it(tmp_path, pbmc3k):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "token_dictionary.pkl").write_bytes(pickle.dumps({"ENSG00000000003": Exploit()}))
    with pytest.raises(DataError, match="Refusing to load .*system"):
        RankValue(dictionary_dir=str(tmp_path)).transform(pbmc3k)
    assert not marker.exists()
    # A class instance (not plain data) is refused too.
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"a": pd.Timestamp(0)}))
    with pytest.raises(DataError, match="Refusing"):
        load_dictionary(tmp_path / "other.pkl", "x")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(DataError, match="must be a dict"):
        load_dictionary(tmp_path / "list.pkl", "x")


def test_bad_input_gives_clear_errors(pbmc3k, geneformer_dir):
    tokenizer = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1"))
    symbols = pbmc3k.copy()
    symbols.var_names = [f"GENE{i}" for i in range(symbols.n_vars)]
    with pytest.raises(DataError, match="needs Ensembl IDs in var; 0 of 1000 var_names look like Ensembl"):
        tokenizer.transform(symbols)
    logged = pbmc3k.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data)
    with pytest.raises(DataError, match="raw integer counts in X; cell .* non-integer value"):
        tokenizer.transform(logged)
    negative = pbmc3k.copy()
    negative.X = negative.X.copy()
    negative.X.data[10] = -3
    with pytest.raises(DataError, match="negative value"):
        tokenizer.transform(negative)
    with pytest.raises(DataError, match="obs column.*'label'"):
        tokenizer.transform(pbmc3k, obs_columns=["label"])
    with pytest.raises(DataError, match="needs Geneformer's token dictionary"):
        RankValue().transform(pbmc3k)
    with pytest.raises(DataError, match="<cls> and <eos>"):
        RankValue(
            model_version="V1", dictionary_dir=str(geneformer_dir / "v1"), special_tokens=True
        ).transform(pbmc3k)


def test_input_files_name_the_dictionaries_used(geneformer_dir):
    tokenizer = RankValue(model_version="V2", dictionary_dir=str(geneformer_dir / "v2"))
    assert sorted(p.name for p in tokenizer.input_files()) == [
        "ensembl_mapping_dict_gc95M.pkl",
        "gene_median_dictionary_gc95M.pkl",
        "token_dictionary_gc95M.pkl",
    ]
    fitted = RankValue(
        model_version="V1",
        token_dictionary=str(geneformer_dir / "v1" / "token_dictionary.tsv"),
        gene_medians="fit",
    )
    assert [p.name for p in fitted.input_files()] == ["token_dictionary.tsv"]
