"""rank_value against a cell-by-cell reference written from the rules of Geneformer's own tokenizer.

The reference (:func:`geneformer_reference`) follows ``geneformer/tokenizer.py`` of Geneformer
(huggingface.co/ctheodoris/Geneformer, commit 7ec90d6 of 2025-10-12); the line numbers in its
comments are that file's. It does not run Geneformer: these tests need neither its code nor loompy.
"""

from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from grnx_core import DataError, TokenizedCells
from grnx_plugins.tokenizers._dictionaries import load_dictionary
from grnx_plugins.tokenizers.rank_value import RankValue, exact_nonzero_medians

VERSIONS = {
    "V1": ("v1", "token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict_gc30M"),
    "V2": ("v2", "token_dictionary_gc95M", "gene_median_dictionary_gc95M", "ensembl_mapping_dict_gc95M"),
}
SPECIAL = {"V1": False, "V2": True}
INPUT_SIZE = {"V1": 2048, "V2": 4096}


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
            "files": {
                "token_dictionary": str(base / f"{tokens}.tsv"),
                "gene_median_dictionary": str(base / f"{medians}.tsv"),
                "ensembl_mapping_dictionary": str(base / f"{mapping}.tsv"),
            },
        }
    return loaded


def geneformer_reference(
    adata: ad.AnnData,
    d: dict,
    version: str,
    *,
    input_size: int | None = None,
    collapse_gene_ids: bool = True,
    gene_id_key: str | None = "ensembl_id",
    summing: bool | None = None,
    totals: np.ndarray | None = None,
) -> tuple[list[str], list[list[int]]]:
    """Geneformer's ``tokenize_data`` on ``adata``, rule by rule, one cell and one gene at a time.

    Returns the names of the cells in the output and their token lists. ``summing`` overrides the
    collapse test (to show that it matters); ``totals`` replaces ``obs["n_counts"]`` (grnx's
    ``n_counts_key: null``). Ties: Python's ``sorted`` is stable, grnx's documented tie-break.
    """
    tokens, medians = d["tokens"], d["medians"]
    # __init__, lines 419-432: without a file every token id maps to itself; entries whose target
    # has no token are dropped.
    mapping = d["mapping"] if d["mapping"] is not None else {k: k for k in tokens}
    mapping = {k: v for k, v in mapping.items() if v in tokens}
    ids = [str(i) for i in (adata.var[gene_id_key] if gene_id_key else adata.var_names)]
    if collapse_gene_ids:
        # sum_ensembl_ids, lines 247-253: the raw ids found in the mapping against their targets.
        in_map = [i for i in ids if i in mapping]
        sums = len(set(in_map)) != len({mapping[i] for i in in_map})
        collapsed = [mapping.get(i.upper()) for i in ids]  # lines 254/258
    else:
        in_dictionary = [i for i in ids if i in tokens]  # lines 238-245
        assert len(in_dictionary) == len(set(in_dictionary)), "Geneformer raises here"
        sums, collapsed = False, [i if i in tokens else None for i in ids]
    if summing is not None:
        sums = summing
    # The genes Geneformer ranks, in its gene order: (their columns, Ensembl id).
    if sums:
        counted = Counter(g for g in collapsed if g is not None)  # lines 259-263
        repeated = [g for g, n in counted.items() if n > 1]
        genes = [([j], g) for j, g in enumerate(collapsed) if g is not None and g not in repeated]
        genes += [([j for j, h in enumerate(collapsed) if h == g], g) for g in repeated]  # lines 265-294
    else:
        genes = [([j], g) for j, g in enumerate(collapsed) if g is not None]
    genes = [(columns, g) for columns, g in genes if not g.startswith("<")]  # line 538
    matrix = adata.X
    sparse = sp.issparse(matrix)
    dense = matrix.toarray() if sparse else np.asarray(matrix)
    obs = adata.obs
    if "filter_pass" in obs.columns:  # lines 552-565
        kept = [c for c, value in enumerate(obs["filter_pass"]) if value == 1]
    else:
        kept = list(range(adata.n_obs))
    n_counts = obs["n_counts"].to_numpy() if totals is None else totals  # lines 227, 573
    recip = np.divide(1, n_counts)  # scipy divides a sparse matrix by multiplying with this
    max_genes = (input_size or INPUT_SIZE[version]) - (2 if SPECIAL[version] else 0)
    names, cells = [], []
    for c in kept:
        row = {j: dense[c, j] for j in np.flatnonzero(dense[c])}
        scored = []
        for columns, gene in genes:
            present = [row[j] for j in columns if j in row]
            if not present:
                continue
            x = dense.dtype.type(sum(present))  # summed in the matrix's dtype (integers: exact)
            median = np.float64(medians[gene])
            if sparse:  # lines 576-577, as scipy computes them
                value = x * recip[c] * 10_000 * np.divide(1, median)
            else:
                value = x / n_counts[c] * 10_000 / median
            scored.append((value, tokens[gene]))
        ranked = [t for _, t in sorted(scored, key=lambda item: -item[0])][:max_genes]  # 65-71, 745-772
        if not ranked:  # lines 600-615
            continue
        if SPECIAL[version]:
            ranked = [tokens["<cls>"], *ranked, tokens["<eos>"]]
        names.append(adata.obs_names[c])
        cells.append(ranked)
    return names, cells


def cells_of(out: TokenizedCells) -> list[list[int]]:
    return [out.cell(i)[0].tolist() for i in range(out.n_cells)]


def write_dictionary(path: Path, entries: dict) -> str:
    path.write_text(json.dumps(entries), encoding="utf-8")  # json.dumps keeps every float exactly
    return str(path)


def with_duplicated_ids(
    pbmc3k: ad.AnnData, d: dict, *, many_to_one: bool, n_counts_dtype: type, seed: int = 0
) -> tuple[ad.AnnData, dict]:
    """pbmc3k plus 20 columns repeating the ids of 20 expressed genes, with other counts (those of
    the same gene in other cells): 10 exact copies, 5 lower-cased copies, and 5 more exact copies
    or, with ``many_to_one``, 5 other ids that the mapping sends to those genes. Also
    ``filter_pass`` (a tenth of the cells 0) and ``n_counts`` in ``n_counts_dtype``.

    Returns the data and the dictionaries to use (V1's identity mapping gains alias entries).
    """
    rng = np.random.default_rng(seed)
    ids = list(pbmc3k.var_names)
    totals = np.asarray(pbmc3k.X.sum(axis=0)).ravel()
    tokenised = [j for j in np.argsort(-totals) if d["mapping"].get(ids[j].upper()) in d["tokens"]]
    sources = rng.choice(tokenised[:60], 20, replace=False)
    new_ids = [ids[j] for j in sources[:10]] + [ids[j].lower() for j in sources[10:15]]
    d = dict(d)
    if many_to_one:
        mapping = dict(d["mapping"])
        for j in sources[15:]:
            target = mapping[ids[j]]
            aliases = [k for k, v in mapping.items() if v == target and k != target and k == k.upper()]
            if not aliases:  # V1's mapping is the identity: add an alias, as a newer mapping would
                aliases = [f"ALIAS_OF_{target}"]
                mapping[aliases[0]] = target
            new_ids.append(aliases[0])
        d["mapping"] = mapping
    else:
        new_ids += [ids[j] for j in sources[15:]]
    extra = pbmc3k.X[:, sources][rng.permutation(pbmc3k.n_obs)]
    adata = ad.AnnData(
        sp.csr_matrix(sp.hstack([pbmc3k.X, extra]), dtype=np.float32),
        obs=pbmc3k.obs.copy(),
        var=pd.DataFrame({"ensembl_id": ids + new_ids}, index=[f"column{j}" for j in range(len(ids) + 20)]),
    )
    adata.obs["filter_pass"] = (rng.random(adata.n_obs) > 0.1).astype(int)
    adata.obs["n_counts"] = adata.obs["n_counts"].astype(n_counts_dtype)
    return adata, d


@pytest.mark.parametrize(
    ("version", "many_to_one", "n_counts_dtype"),
    [
        ("V1", False, np.float64),
        ("V1", True, np.float32),
        ("V2", False, np.float32),
        ("V2", True, np.float64),
    ],
)
def test_duplicated_ids_as_geneformer(pbmc3k, dictionaries, tmp_path, version, many_to_one, n_counts_dtype):
    """20 duplicated ids: kept as separate genes under a one-to-one mapping, summed under a
    many-to-one one; identical tokens, lengths and carried columns, cells at the truncation limit."""
    adata, d = with_duplicated_ids(
        pbmc3k, dictionaries[version], many_to_one=many_to_one, n_counts_dtype=n_counts_dtype
    )
    files = dict(d["files"])
    if d["mapping"] is not dictionaries[version]["mapping"]:
        tag = "gc30M" if version == "V1" else "gc95M"
        files["ensembl_mapping_dictionary"] = write_dictionary(
            tmp_path / f"ensembl_mapping_dict_{tag}_aliases.json", d["mapping"]
        )
    # An input size that truncates about half of the cells.
    _, untruncated = geneformer_reference(adata, d, version)
    size = int(np.median([len(c) for c in untruncated]))
    tokenizer = RankValue(model_version=version, gene_id_key="ensembl_id", model_input_size=size, **files)
    out = tokenizer.transform(adata, obs_columns=["cell_type", "donor"])
    names, expected = geneformer_reference(adata, d, version, input_size=size)

    assert 0 < sum(len(c) == size for c in expected) < len(expected)  # cells at the limit, and below it
    assert list(out.obs.index) == names and len(names) < adata.n_obs  # filter_pass dropped some
    assert cells_of(out) == expected
    assert out.lengths.tolist() == [len(c) for c in expected]
    pd.testing.assert_frame_equal(out.obs, adata.obs.loc[names, ["cell_type", "donor"]])
    assert out.metadata["duplicate_ids"] == ("summed" if many_to_one else "kept")
    assert out.metadata["normalisation"]["precision"] == np.dtype(n_counts_dtype).name
    if not many_to_one:  # the same token twice in a cell
        assert sum(len(set(c)) < len(c) for c in expected) > len(expected) // 2
    # The collapse test decides: the other choice changes most cells.
    _, other = geneformer_reference(adata, d, version, input_size=size, summing=not many_to_one)
    assert sum(a != b for a, b in zip(expected, other)) > len(expected) // 2
    # duplicate_ids: sum always sums, placed as Geneformer places summed genes.
    summed = RankValue(
        model_version=version, gene_id_key="ensembl_id", model_input_size=size, duplicate_ids="sum", **files
    ).transform(adata)
    assert cells_of(summed) == geneformer_reference(adata, d, version, input_size=size, summing=True)[1]


@pytest.mark.parametrize("version", ["V1", "V2"])
def test_full_input_size_on_pbmc3k(pbmc3k, geneformer_dir, dictionaries, version):
    folder = geneformer_dir / VERSIONS[version][0]
    out = (
        RankValue(model_version=version, dictionary_dir=str(folder))
        .fit(pbmc3k)
        .transform(pbmc3k, obs_columns=["cell_type", "donor"])
    )
    names, expected = geneformer_reference(pbmc3k, dictionaries[version], version, gene_id_key=None)
    assert out.n_cells == pbmc3k.n_obs and list(out.obs.index) == names
    assert cells_of(out) == expected
    pd.testing.assert_frame_equal(out.obs, pbmc3k.obs[["cell_type", "donor"]])
    assert out.metadata["special_ids"] == ([0, 1, 2, 3] if SPECIAL[version] else [0, 1])
    assert out.metadata["duplicate_ids"] == "kept" and out.metadata["n_var_duplicating_other_columns"] == 0
    # 992 (V1) / 984 (V2) of the 1,000 genes have a token in these dictionaries.
    d = dictionaries[version]
    assert out.metadata["n_var_tokenised"] == sum(
        (d["mapping"].get(g.upper()) in d["tokens"]) for g in pbmc3k.var_names
    )


def _planted(single: bool) -> tuple[float, float]:
    """(n_counts, median of gene B) for a cell with counts A=3, B=7 (median of A: 1) where
    Geneformer's sparse arithmetic (in float32 when ``single``) orders A and B otherwise than the
    alternative: float64 when ``single``, else division (Geneformer's arithmetic on dense data)."""

    def value(x, n, median, single, divide):
        x, n = (np.float32(x), np.float32(n)) if single else (np.float64(x), np.float64(n))
        unscaled = (x / n if divide else x * np.divide(1, n)) * 10_000
        return unscaled / np.float64(median) if divide else unscaled * np.divide(1, np.float64(median))

    for n in (7919.0, 12345.0, 3001.0, 2749.0):
        for k in range(-300, 301):
            median = 7 / 3 * (1 + k * (1e-9 if single else 2.0**-52))
            ours = value(3, n, 1.0, single, False), value(7, n, median, single, False)
            other = value(3, n, 1.0, False, not single), value(7, n, median, False, not single)
            if ours[0] != ours[1] and other[0] != other[1] and (ours[0] > ours[1]) != (other[0] > other[1]):
                return n, median
    pytest.fail("no planted case found")


@pytest.mark.parametrize(("single", "dense"), [(True, False), (True, True), (False, False), (False, True)])
def test_normalisation_has_geneformers_precision_and_operations(tmp_path, single, dense):
    """float32 counts with float32 n_counts normalise in float32 (numpy's promotion); counts are
    multiplied by reciprocals, as scipy computes Geneformer's lines 576-577 on sparse matrices,
    and dense matrices give the same tokens (Geneformer divides those: the documented difference)."""
    n, median_b = _planted(single)
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, "GENE_A": 4, "GENE_B": 5}
    d = {"tokens": tokens, "medians": {"GENE_A": 1.0, "GENE_B": median_b}, "mapping": None}
    files = {
        "token_dictionary": write_dictionary(tmp_path / "token_dictionary.json", tokens),
        "gene_median_dictionary": write_dictionary(tmp_path / "gene_median_dictionary.json", d["medians"]),
    }
    counts = np.array([[3.0, 7.0]], dtype=np.float32)
    sparse = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=["GENE_A", "GENE_B"]))
    sparse.obs["n_counts"] = np.array([n], dtype=np.float32 if single else np.float64)
    adata = sparse.copy()
    if dense:
        adata.X = counts
    out = RankValue(**files).transform(adata)
    _, expected = geneformer_reference(sparse, d, "V2", gene_id_key=None)
    assert cells_of(out) == expected
    assert out.metadata["normalisation"]["precision"] == ("float32" if single else "float64")
    # ...where the alternative gives the other order.
    if single:
        adata.obs["n_counts"] = adata.obs["n_counts"].astype(np.float64)
        assert cells_of(RankValue(**files).transform(adata)) != expected
    else:
        dense_data = sparse.copy()
        dense_data.X = counts
        assert geneformer_reference(dense_data, d, "V2", gene_id_key=None)[1] != expected


def test_collapse_gene_ids_false(pbmc3k, dictionaries):
    d = dictionaries["V2"]
    adata = pbmc3k.copy()
    ids = list(adata.var_names)
    # A lower-cased id and a mapped alias are not looked up through the mapping: not tokenised.
    alias = next(k for k, v in d["mapping"].items() if v == ids[1] and k != ids[1])
    ids[0], ids[1] = ids[0].lower(), alias
    adata.var["ensembl_id"] = ids
    out = RankValue(gene_id_key="ensembl_id", collapse_gene_ids=False, **d["files"]).transform(adata)
    _, expected = geneformer_reference(adata, d, "V2", collapse_gene_ids=False)
    assert cells_of(out) == expected
    assert out.metadata["n_var_tokenised"] == sum(i in d["tokens"] for i in ids)
    with_mapping = RankValue(gene_id_key="ensembl_id", **d["files"]).transform(adata)
    mapped = [d["mapping"].get(i.upper()) for i in ids]
    assert with_mapping.metadata["n_var_tokenised"] == sum(m in d["tokens"] for m in mapped)
    assert mapped[0] in d["tokens"] and mapped[1] in d["tokens"]  # both tokenised with the mapping
    # An id of the token dictionary in two columns is an error, as in Geneformer.
    ids[5] = ids[9]
    adata.var["ensembl_id"] = ids
    with pytest.raises(DataError, match="appear in several columns.*collapse_gene_ids is false"):
        RankValue(gene_id_key="ensembl_id", collapse_gene_ids=False, **d["files"]).transform(adata)
    with pytest.raises(ValidationError, match="duplicate_ids 'sum' needs collapse_gene_ids true"):
        RankValue(collapse_gene_ids=False, duplicate_ids="sum")


def test_model_version_must_match_the_dictionaries(pbmc3k, geneformer_dir, dictionaries, tmp_path):
    with pytest.raises(DataError, match="model_version V1 .* holds <cls> and <eos>: it is a V2"):
        RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v2")).transform(pbmc3k)
    with pytest.raises(DataError, match="model_version V2 .* has no <cls> and <eos>: it is a V1"):
        RankValue(model_version="V2", dictionary_dir=str(geneformer_dir / "v1")).transform(pbmc3k)
    # A V1 token dictionary with the medians of the gc95M corpus (named for it).
    mixed = dict(
        dictionaries["V1"]["files"],
        gene_median_dictionary=dictionaries["V2"]["files"]["gene_median_dictionary"],
    )
    with pytest.raises(DataError, match="gene median dictionary .*gc95M.* named for the gc95M corpus"):
        RankValue(model_version="V1", **mixed).transform(pbmc3k)
    # Ids beyond a V1 model's vocabulary.
    big = write_dictionary(
        tmp_path / "token_dictionary.json", {"<pad>": 0, "<mask>": 1, "ENSG00000000003": 30000}
    )
    with pytest.raises(DataError, match="beyond a V1 model's vocabulary of 25,426"):
        RankValue(model_version="V1", token_dictionary=big, gene_medians="fit").transform(pbmc3k)
    with pytest.raises(ValidationError, match="special_tokens true does not fit model_version V1"):
        RankValue(model_version="V1", special_tokens=True)
    with pytest.raises(ValidationError, match="special_tokens false does not fit model_version V2"):
        RankValue(model_version="V2", special_tokens=False)
    with pytest.raises(ValidationError, match="model_input_size 4096 is more than a V1 model reads"):
        RankValue(model_version="V1", model_input_size=4096)
    RankValue(model_version="V1", special_tokens=False, model_input_size=2048)  # agreeing values are fine


def test_filter_pass_compared_as_geneformer(pbmc3k, geneformer_dir):
    tokenizer = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1"))
    adata = pbmc3k.copy()
    keep = np.arange(adata.n_obs) % 4 != 0
    expected = list(adata.obs_names[keep])
    for values in (
        keep.astype(int),
        keep.astype(float),
        keep,  # booleans: True == 1
        np.where(keep, 1.0, np.nan),  # NaN != 1
        pd.Categorical(keep.astype(int)),
        pd.array([1 if k else pd.NA for k in keep], dtype="Int64"),
        np.array([1 if k else None for k in keep], dtype=object),  # None != 1
    ):
        adata.obs["filter_pass"] = values
        out = tokenizer.transform(adata)
        assert list(out.obs.index) == expected, values
        assert out.metadata["n_cells_filtered_out"] == int((~keep).sum())
    adata.obs["filter_pass"] = np.where(keep, "1", "0")  # strings: Geneformer would keep no cell
    with pytest.raises(DataError, match=r"obs\['filter_pass'\] holds strings \(e.g. '[01]'\).*astype\(int\)"):
        tokenizer.transform(adata)
    adata.obs["filter_pass"] = pd.Categorical(np.where(keep, "yes", "no"))
    with pytest.raises(DataError, match="holds strings"):
        tokenizer.transform(adata)
    adata.obs["filter_pass"] = 0
    with pytest.raises(DataError, match="equals 1 in none of the 200 cells"):
        tokenizer.transform(adata)


def test_n_counts_is_required_and_never_replaced(pbmc3k, geneformer_dir, dictionaries):
    tokenizer = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1"))
    adata = pbmc3k.copy()
    del adata.obs["n_counts"]
    with pytest.raises(
        DataError, match=r"needs each cell's total count in obs\['n_counts'\].*n_counts_key: null"
    ):
        tokenizer.transform(adata)
    adata.obs["n_counts"] = pbmc3k.obs["n_counts"].to_numpy()
    adata.obs.loc[adata.obs_names[7], "n_counts"] = np.nan
    with pytest.raises(
        DataError, match="missing \\(NaN\\) or infinite for 1 of the 200 cells.*'" + adata.obs_names[7]
    ):
        tokenizer.transform(adata)
    adata.obs["filter_pass"] = (np.arange(adata.n_obs) != 7).astype(
        int
    )  # a filtered-out cell's NaN is not read
    assert tokenizer.transform(adata).n_cells == adata.n_obs - 1
    adata.obs["n_counts"] = pd.array(np.where(np.arange(adata.n_obs) == 3, None, 5000), dtype="Int64")
    with pytest.raises(DataError, match="missing"):
        tokenizer.transform(adata)
    adata.obs["n_counts"] = "many"
    with pytest.raises(DataError, match="must hold each cell's total count as numbers"):
        tokenizer.transform(adata)
    # n_counts_key: null asks for the row sums.
    row_sums = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1"), n_counts_key=None)
    totals = np.asarray(pbmc3k.X.sum(axis=1), dtype=np.float64).ravel()
    out = row_sums.transform(pbmc3k)
    assert (
        cells_of(out)
        == geneformer_reference(pbmc3k, dictionaries["V1"], "V1", gene_id_key=None, totals=totals)[1]
    )
    assert out.metadata["n_counts_source"] == "row sums (n_counts_key: null)"


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


def test_empty_cells_and_workers(pbmc3k, geneformer_dir, tmp_path):
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


def test_backed_and_in_memory_give_identical_tokens(pbmc3k, dictionaries, tmp_path):
    adata, d = with_duplicated_ids(pbmc3k, dictionaries["V2"], many_to_one=True, n_counts_dtype=np.float32)
    del adata.obs["filter_pass"]
    path = tmp_path / "pbmc.h5ad"
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # X normalised; the counts layer is read
    adata.write_h5ad(path)
    files = dict(
        d["files"], ensembl_mapping_dictionary=write_dictionary(tmp_path / "mapping.json", d["mapping"])
    )
    params = dict(model_version="V2", gene_id_key="ensembl_id", **files)
    memory = RankValue(**params).transform(adata, obs_columns=["cell_type"])
    backed = ad.read_h5ad(path, backed="r")
    streamed = RankValue(**params, chunk_size=7, n_workers=2).transform(
        backed, obs_columns=["cell_type"], path=tmp_path / "tokens"
    )
    np.testing.assert_array_equal(memory.input_ids, streamed.input_ids)
    np.testing.assert_array_equal(memory.offsets, streamed.offsets)
    pd.testing.assert_frame_equal(memory.obs, streamed.obs)
    assert streamed.metadata["duplicate_ids"] == "summed"
    reloaded = TokenizedCells.load(tmp_path / "tokens")
    np.testing.assert_array_equal(reloaded.input_ids, memory.input_ids)
    # A view of the backed file (cells out of order) gives the same tokens as those cells in memory.
    order = np.array([17, 3, 150, 4, 99])
    view = RankValue(**params, chunk_size=2).transform(backed[order])
    np.testing.assert_array_equal(view.input_ids, memory.subset(order).input_ids)
    backed.file.close()
    # Dense and sparse matrices holding the same counts give the same tokens.
    adata.layers["counts"] = adata.layers["counts"].toarray()
    adata.obs["n_counts"] = adata.obs["n_counts"].astype(np.float64)
    dense = RankValue(**params).transform(adata)
    assert dense.metadata["normalisation"]["operations"] == "x * (1 / n_counts) * 10000 * (1 / median)"
    np.testing.assert_array_equal(dense.input_ids, memory.input_ids)


def test_fitted_medians_match_numpy(pbmc3k, geneformer_dir):
    """gene_medians: fit -> np.median of the non-zero normalised values per gene (exact), whether
    the values fit in memory or need the multi-pass narrowing."""
    adata = pbmc3k.copy()
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
    tokens = load_dictionary(geneformer_dir / "v1" / "token_dictionary.tsv", "t")
    expected = {}
    for j, gene_id in enumerate(adata.var_names):
        gene = mapping.get(gene_id.upper())
        column = dense[:, j]
        if gene is None or gene not in tokens or not (column > 0).any():
            continue
        nonzero = column > 0
        # Geneformer's sparse arithmetic: x * (1 / n_counts) * 10,000.
        expected[gene] = float(np.median(column[nonzero] * np.divide(1, n_counts[nonzero]) * 10_000))
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


def test_bad_input_gives_clear_errors(pbmc3k, geneformer_dir, tmp_path):
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
    zero = pbmc3k.copy()
    zero.obs["n_counts"] = zero.obs["n_counts"].where(np.arange(zero.n_obs) != 4, 0.0)
    with pytest.raises(
        DataError, match=f"cell '{zero.obs_names[4]}' has expressed genes but a total count of 0"
    ):
        tokenizer.transform(zero)
    with pytest.raises(DataError, match="obs column.*'label'"):
        tokenizer.transform(pbmc3k, obs_columns=["label"])
    with pytest.raises(DataError, match="needs Geneformer's token dictionary"):
        RankValue().transform(pbmc3k)
    # A gene with a token but no median: Geneformer fails (KeyError); grnx says which.
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3, pbmc3k.var_names[0]: 4, pbmc3k.var_names[1]: 5}
    files = {
        "token_dictionary": write_dictionary(tmp_path / "token_dictionary.json", tokens),
        "gene_median_dictionary": write_dictionary(
            tmp_path / "gene_median_dictionary.json", {pbmc3k.var_names[0]: 1.5}
        ),
    }
    with pytest.raises(
        DataError, match=f"1 genes of the data have a token but no median .*{pbmc3k.var_names[1]}"
    ):
        RankValue(**files).transform(pbmc3k)


def test_export_option_writes_geneformers_dataset(pbmc3k, geneformer_dir, tmp_path):
    from grnx_plugins.tokenizers.export import read_geneformer_dataset

    tokenizer = RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1"), export="geneformer")
    tokens = tokenizer.transform(pbmc3k, obs_columns=["cell_type", "donor"], path=tmp_path / "tokens")
    written = tokenizer.write_artifacts(tmp_path / "tokens", tmp_path / "exports")
    assert list(written) == ["tokens/geneformer.dataset"]
    rows = read_geneformer_dataset(written["tokens/geneformer.dataset"])
    assert list(rows.columns) == ["input_ids", "cell_type", "donor", "length"]
    assert [list(ids) for ids in rows["input_ids"]] == cells_of(tokens)
    assert rows["input_ids"][0].dtype == np.int16  # V1 dictionaries hold int16 token ids
    assert (
        RankValue(model_version="V1", dictionary_dir=str(geneformer_dir / "v1")).write_artifacts(
            tmp_path / "tokens", tmp_path / "none"
        )
        == {}
    )


def test_saved_state_names_the_dictionaries_and_reloads_them(pbmc3k, dictionaries, tmp_path):
    """The state holds the dictionary files (names, SHA-256) and fitted medians, not the
    dictionaries; a loaded tokenizer reads them again and refuses files that changed."""
    files = {k: tmp_path / Path(v).name for k, v in dictionaries["V2"]["files"].items()}
    for kind, path in files.items():
        path.write_bytes(Path(dictionaries["V2"]["files"][kind]).read_bytes())
    tokenizer = RankValue(**{k: str(v) for k, v in files.items()}).fit(pbmc3k)
    expected = cells_of(tokenizer.transform(pbmc3k))
    tokenizer.save(tmp_path / "state")
    assert sum(f.stat().st_size for f in (tmp_path / "state").iterdir()) < 10_000
    loaded = RankValue.load(tmp_path / "state")
    assert cells_of(loaded.transform(pbmc3k)) == expected
    medians = files["gene_median_dictionary"]
    medians.write_text(medians.read_text().replace("\t1.", "\t2.", 1))
    with pytest.raises(DataError, match="the gene median dictionary changed since this tokenizer was fitted"):
        RankValue.load(tmp_path / "state").transform(pbmc3k)
    refitted = RankValue.load(tmp_path / "state").fit(pbmc3k)  # fitting again takes the files as they are
    assert refitted.transform(pbmc3k).n_cells == pbmc3k.n_obs


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


def test_layer_raw_tokenises_every_gene_kept_by_a_highly_variable_gene_subset(pbmc3k, geneformer_dir):
    """After highly_variable_genes with subset (X and layers keep 100 genes, raw every gene's counts),
    layer: raw gives the tokens of the data before the subset; the default reads only the 100."""
    import scanpy as sc

    from grnx_plugins.preprocess.highly_variable_genes import HighlyVariableGenes

    subset = pbmc3k.copy()
    subset.layers["counts"] = subset.X.copy()
    sc.pp.normalize_total(subset, target_sum=1e4)
    sc.pp.log1p(subset)
    subset = HighlyVariableGenes(n_top_genes=100, subset=True)(subset)
    assert subset.n_vars == 100 and subset.raw.n_vars == pbmc3k.n_vars
    settings = {"model_version": "V1", "dictionary_dir": str(geneformer_dir / "v1"), "model_input_size": 256}
    before = RankValue(**settings).transform(pbmc3k)
    from_raw = RankValue(**settings, layer="raw").transform(subset)
    np.testing.assert_array_equal(from_raw.input_ids, before.input_ids)
    np.testing.assert_array_equal(from_raw.offsets, before.offsets)
    assert from_raw.metadata["layer"] == "raw.X"
    only_hvgs = RankValue(**settings).transform(subset)
    assert only_hvgs.lengths.max() <= 100 < before.lengths.max()
    subset.raw = None
    with pytest.raises(DataError, match="layer 'raw' reads adata.raw, but the data has none"):
        RankValue(**settings, layer="raw").transform(subset)
