"""Geneformer rank-value tokenisation: each cell's genes ordered by median-scaled normalised expression."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from grnx_core import ComponentParams, DataError, TokenizedCells, Tokenizer

if TYPE_CHECKING:
    import anndata
    import scipy.sparse as sp

    from grnx_plugins.tokenizers._streaming import ChunkTokens

#: Geneformer's scaling of each cell to 10,000 counts before dividing by the gene medians.
TARGET_SUM = 10_000.0
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)
_WHO = "Tokenizer 'rank_value'"

#: The two Geneformer model series: dictionaries (tags in their file names), input size, specials.
MODEL_SERIES = {
    "V1": {"corpora": ("30",), "input_size": 2048, "special_tokens": False, "dictionaries": "gc30M"},
    "V2": {
        "corpora": ("95", "104"),
        "input_size": 4096,
        "special_tokens": True,
        "dictionaries": "gc95M/gc104M",
    },
}
#: A V1 model's vocabulary: <pad>, <mask> and 25,424 genes.
V1_VOCABULARY_SIZE = 25_426
_CORPUS_TAG = re.compile(r"gc(\d+)M", re.IGNORECASE)


@dataclass
class _RankPlan:
    """What a worker needs to tokenise a row block (picklable)."""

    col_slot: np.ndarray  # input column -> slot, -1 when the column is not tokenised
    n_single: int  # slots [0, n_single) hold one column each; later slots sum several
    slot_token: np.ndarray  # slot -> token id
    slot_recip_median: np.ndarray  # slot -> 1 / median, as numpy computes it
    max_genes: int
    cls_id: int
    eos_id: int
    single: bool  # float32 normalisation (see _single_precision)
    drop_empty: bool
    source: str  # "X" or "layers['counts']", for messages


@dataclass
class _Slots:
    """The data's columns grouped as Geneformer groups them (see :meth:`RankValue._slots`)."""

    col_slot: np.ndarray
    n_single: int
    slot_gene: list[str]
    facts: dict[str, Any]


def _rank_value_kernel(plan: _RankPlan, block: sp.csr_matrix, per_row: dict[str, np.ndarray]) -> ChunkTokens:
    from grnx_plugins.tokenizers import _kernels
    from grnx_plugins.tokenizers._streaming import ChunkTokens

    ids, lengths, n_genes, flags, bad_row, bad_value = _kernels.rank_value_chunk(
        block.indptr.astype(np.int64),
        block.indices,
        block.data,
        per_row["n_counts"],
        per_row["recip_counts"],
        plan.col_slot,
        plan.n_single,
        plan.slot_token,
        plan.slot_recip_median,
        plan.max_genes,
        plan.cls_id,
        plan.eos_id,
        TARGET_SUM,
        plan.single,
        True,
    )
    empty = n_genes == 0
    result = ChunkTokens(
        input_ids=ids,
        lengths=lengths,
        keep=~empty if plan.drop_empty else None,
        counters={"n_cells_without_genes": int(empty.sum())},
    )
    problem = _describe_flags(flags, plan.source)
    if problem is not None:
        result.problem, result.problem_row, result.problem_value = problem, int(bad_row), float(bad_value)
    return result


def _describe_flags(flags: int, source: str) -> str | None:
    from grnx_plugins.tokenizers import _kernels

    if flags & _kernels.NON_FINITE:
        found = "a non-finite value ({value})"
    elif flags & _kernels.NEGATIVE:
        found = "a negative value ({value})"
    elif flags & _kernels.NON_INTEGER:
        found = "a non-integer value ({value})"
    elif flags & _kernels.ZERO_TOTAL:
        return (
            f"{_WHO}: cell {{cell!r}} has expressed genes but a total count of {{value}}; the total "
            "(obs['n_counts'], or the row sum with n_counts_key: null) must be > 0. Fix that cell's total "
            "or drop the cell."
        )
    else:
        return None
    return (
        f"{_WHO} needs raw integer counts in {source}; cell {{cell!r}} has {found}. "
        f"Point the tokenizer's 'layer' parameter at the raw counts (data sources keep them in "
        f"layers['counts']), or tokenise before normalising."
    )


def _single_precision(matrix_dtype: np.dtype, counts_dtype: np.dtype) -> bool:
    """Whether Geneformer's ``X_view / n_counts * target_sum`` runs in float32 for counts of
    ``matrix_dtype`` and an ``n_counts`` column of ``counts_dtype`` (numpy's type promotion; the
    division by the float64 medians that follows always runs in float64)."""
    one = np.ones(1, dtype=matrix_dtype)
    count = np.ones(1, dtype=counts_dtype)
    result = np.multiply(one, np.divide(1, count)) * 10_000
    if result.dtype not in (np.float32, np.float64):
        raise DataError(
            f"{_WHO}: counts stored as {np.dtype(matrix_dtype)} with n_counts as {np.dtype(counts_dtype)} "
            f"normalise in {result.dtype}, which grnx does not reproduce. Store n_counts as float64 "
            f"(e.g. adata.obs['n_counts'] = adata.obs['n_counts'].astype('float64'))."
        )
    return bool(result.dtype == np.float32)


class RankValue(Tokenizer):
    """Geneformer's rank-value encoding (Theodoris et al., Nature 2023), V1 and V2 model series.

    Reproduces Geneformer's ``TranscriptomeTokenizer.tokenize_data`` on an h5ad file. Reference:
    ``geneformer/tokenizer.py`` of Geneformer (huggingface.co/ctheodoris/Geneformer) at its commit
    7ec90d6 of 2025-10-12, as mirrored in github.com/explorerwjy/Geneformer; line numbers below are
    that file's. The rules, in the order they apply:

    1. Model series (``__init__``, lines 368-407): V1 means the gc30M dictionaries, 2,048 tokens
       and no special tokens; V2 the gc95M/gc104M dictionaries, 4,094 genes between ``<cls>`` and
       ``<eos>`` (4,096 tokens). grnx refuses a mismatch instead of warning (line 405): a V1 token
       dictionary holds neither ``<cls>`` nor ``<eos>``, a V2 one holds both, a dictionary file whose
       name carries a corpus tag (``gc30M``, ``gc95M``, ``gc104M``) must match the series, V1 ids
       stay below 25,426, and ``model_input_size`` may lower the limit but never exceed it.
    2. The mapping dictionary is kept only where its target has a token (lines 429-432); without
       one, every token id maps to itself (line 423).
    3. Duplicated IDs (``sum_ensembl_ids``, lines 234-296). With ``collapse_gene_ids`` (default):
       the *raw* ids (not upper-cased) found among the mapping's keys are compared with their
       targets; only when there are more distinct ids than distinct targets (a many-to-one mapping,
       line 253) are columns summed. Each column's id is upper-cased and mapped (lines 254/258);
       then, when summing, every target held by several columns (exact duplicates included) is
       summed over its columns before normalisation, and the summed genes go after the other
       genes, in the order of their first column (lines 261-294). Otherwise every column stays a
       gene of its own, normalised with the same median, so a token can appear twice in a cell.
       ``collapse_gene_ids: false``: raw ids looked up in the token dictionary as they are (no
       mapping, no upper-casing), and an id in several columns is an error (line 245); Geneformer
       itself then fails on the missing ``ensembl_id_collapsed`` column (line 539), so grnx
       implements the intent. ``duplicate_ids: sum`` always sums columns of the same gene (grnx's
       behaviour before version 2), placed as in the summing case.
    4. Genes are the columns whose mapped id has a token (line 538) and a median (line 543, where
       Geneformer raises ``KeyError``; grnx raises a DataError naming the genes, and with
       ``gene_medians: fit`` leaves out the genes no training cell expresses).
    5. Cells: those with ``obs["filter_pass"] == 1`` compared value by value as Python compares
       them (line 560: ``1``, ``1.0`` and ``True`` pass; NaN does not); grnx refuses a column of
       strings (Geneformer silently keeps no cell) and a filter that keeps no cell. Without the
       column every cell is tokenised (line 565).
    6. ``obs["n_counts"]`` is required and used as given (lines 225-227, 573): grnx refuses a missing
       column, NaN or infinite totals (Geneformer would rank NaNs) and totals <= 0 in a cell with
       expressed genes; ``n_counts_key: null`` uses each row's sum over all columns instead, on
       request only.
    7. Normalisation (lines 576-577) with the operations Geneformer performs on a sparse matrix:
       ``x * (1 / n_counts) * 10_000 * (1 / median)`` (scipy divides a sparse matrix by a dense
       array by multiplying with the array's reciprocal), the first two in float32 when the counts
       and ``n_counts`` are both float32 (numpy's type promotion), the last in float64.
    8. Genes ranked by value, descending (lines 65-71, ``np.argsort(-v)``), truncated to the input
       size, ``<cls>``/``<eos>`` added for V2 (lines 745-775); cells left without genes are
       removed (lines 600-615), unless ``drop_empty_cells`` is false.

    Where grnx deliberately differs: ``np.argsort`` (quicksort) leaves the order of exactly equal
    values arbitrary; grnx sorts stably, so tied genes keep Geneformer's gene order (the columns,
    then the summed genes) and two copies of one gene, being the same token, need no order. A CSR
    matrix that *stores* zeros makes Geneformer rank those genes last (its h5ad path keeps stored
    entries; its loom path and documented method mask undetected genes); grnx skips them, as the
    method says. On a *dense* matrix Geneformer divides (``x / n_counts * 10_000 / median``),
    which rounds differently from the products above only in exact ties (e.g. a cell holding a
    gene at exactly its median); grnx computes as for sparse matrices, so that sparse and dense
    inputs give the same tokens (Geneformer cannot sum duplicated ids of a dense matrix at all:
    ``pd.DataFrame.sparse.from_spmatrix`` fails, line 276). Counts must be non-negative integers
    (checked; Geneformer does not check).

    Medians come from Geneformer's gene median dictionary, or (``gene_medians: fit``) from the
    training cells: the non-zero median of the normalised count (step 7 without the median) per
    gene, computed exactly from chunk passes with memory bounded by ``median_memory_values``.

    Dictionaries are read from Geneformer's ``.pkl`` files with a restricted unpickler (plain
    dict/str/int/float and numpy scalars only; anything else is refused) or from TSV/JSON.

    Reads ``layer`` (default ``layers["counts"]`` when present, else ``X``), ``var[gene_id_key]``
    (default ``var_names``), ``obs[n_counts_key]``, ``obs[filter_pass_key]``. Streams row chunks of
    in-memory or backed AnnData, optionally in ``n_workers`` processes; pass ``path`` to
    :meth:`transform` to stream the tokens to disk instead of memory. ``export: geneformer`` also
    writes Geneformer's ``.dataset`` (see :func:`~grnx_plugins.tokenizers.export.to_geneformer_dataset`)
    beside the tokens of a ``grnx run``, logged as the artifact ``tokens/geneformer.dataset``.
    """

    name = "rank_value"
    description = (
        "Geneformer rank-value encoding (V1 2048 tokens / V2 4096 with <cls>/<eos>) from raw counts."
    )
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    __version__ = "2"

    class Params(ComponentParams):
        model_version: Literal["V1", "V2"] = Field(
            "V2",
            description="Geneformer series: V1 (gc30M dictionaries, 2048 tokens, no special "
            "tokens) or V2 (gc95M/gc104M dictionaries, 4096 tokens with <cls> and <eos>)",
        )
        dictionary_dir: str | None = Field(
            None,
            description="folder with Geneformer's token_dictionary*, gene_median_dictionary* and "
            "ensembl_mapping_dict* files (.pkl, .tsv or .json); the file parameters override it",
        )
        token_dictionary: str | None = Field(
            None, description="token dictionary file (Ensembl id -> token id)"
        )
        gene_median_dictionary: str | None = Field(
            None, description="gene median dictionary file (Ensembl id -> non-zero median)"
        )
        ensembl_mapping_dictionary: str | None = Field(
            None,
            description="Ensembl mapping dictionary file (id -> Ensembl id); none: ids map to themselves",
        )
        gene_medians: Literal["dictionary", "fit"] = Field(
            "dictionary",
            description="'dictionary': Geneformer's medians; 'fit': non-zero medians of the "
            "normalised expression of the training cells",
        )
        model_input_size: int | None = Field(
            None,
            ge=3,
            description="tokens per cell including special tokens; default and maximum 2048 (V1) / 4096 (V2)",
        )
        special_tokens: bool | None = Field(
            None,
            description="<cls> first and <eos> last: must be false for V1 and true for V2 (the default)",
        )
        gene_id_key: str | None = Field(None, description="var column with Ensembl ids; var_names when null")
        layer: str | None = Field(
            None,
            description="layer with raw integer counts; 'raw': adata.raw (every gene, after a "
            "highly-variable-gene subset); null: layers['counts'] when present, else X",
        )
        n_counts_key: str | None = Field(
            "n_counts",
            description="obs column with each cell's total count, required as in Geneformer; null: "
            "use each row's sum over all columns of the matrix tokenised",
        )
        filter_pass_key: str = Field(
            "filter_pass", description="obs column; only cells where it equals 1 are kept (when present)"
        )
        collapse_gene_ids: bool = Field(
            True,
            description="Geneformer's collapse_gene_ids: map ids through the mapping dictionary and sum "
            "columns when it maps ids many-to-one; false: ids as given, duplicated ids are an error",
        )
        duplicate_ids: Literal["geneformer", "sum"] = Field(
            "geneformer",
            description="columns with the same gene: 'geneformer' sums them only when Geneformer does "
            "(a many-to-one mapping), else keeps each as its own token; 'sum': always sum them",
        )
        export: Literal["geneformer"] | None = Field(
            None,
            description="also write the tokens as Geneformer's .dataset (logged as the artifact "
            "tokens/geneformer.dataset of a grnx run)",
        )
        drop_empty_cells: bool = Field(
            True, description="drop cells with no tokenisable gene (as Geneformer)"
        )
        chunk_size: int = Field(2048, ge=1, description="cells read and tokenised per chunk")
        n_workers: int = Field(1, ge=1, description="worker processes tokenising chunks in parallel")
        median_memory_values: int = Field(
            20_000_000,
            ge=1000,
            description="values held at once when computing medians in fit",
        )

        @model_validator(mode="after")
        def _agrees_with_the_model_series(self) -> RankValue.Params:
            series = MODEL_SERIES[self.model_version]
            limit = series["input_size"]
            if self.model_input_size is not None and self.model_input_size > limit:
                raise ValueError(
                    f"model_input_size {self.model_input_size} is more than a {self.model_version} model "
                    f"reads ({limit} tokens); use {limit} or less"
                )
            if self.special_tokens is not None and self.special_tokens != series["special_tokens"]:
                raise ValueError(
                    f"special_tokens {str(self.special_tokens).lower()} does not fit model_version "
                    f"{self.model_version}: {self.model_version} models are trained "
                    f"{'with' if series['special_tokens'] else 'without'} <cls> and <eos>; leave "
                    "special_tokens unset"
                )
            if not self.collapse_gene_ids and self.duplicate_ids == "sum":
                raise ValueError(
                    "duplicate_ids 'sum' needs collapse_gene_ids true (with collapse_gene_ids false, "
                    "duplicated ids are an error, as in Geneformer)"
                )
            return self

    # ---- dictionaries ------------------------------------------------------------------------

    def _dictionary_path(self, explicit: str | None, prefix: str, what: str) -> Path | None:
        from grnx_plugins.tokenizers._dictionaries import find_dictionary

        if explicit is not None:
            return Path(explicit).expanduser()
        if self.dictionary_dir is not None:
            return find_dictionary(self.dictionary_dir, prefix, what)
        return None

    def _dictionaries(self) -> dict[str, Any]:
        """The dictionaries, read once per instance. They are not part of the saved state (the
        files are; a tokenizer loaded from its state reads them again and checks they are the
        files it was fitted with)."""
        cached = getattr(self, "_loaded", None)
        if cached is not None:
            return cached
        from grnx_plugins.tokenizers._dictionaries import load_dictionary

        token_path = self._dictionary_path(self.token_dictionary, "token_dictionary", "token dictionary")
        if token_path is None:
            raise DataError(
                f"{_WHO} needs Geneformer's token dictionary: set tokenizer.params."
                "dictionary_dir to the folder holding it (e.g. Geneformer's geneformer/ or "
                "gene_dictionaries_30m/), or tokenizer.params.token_dictionary to the file."
            )
        tokens = load_dictionary(token_path, "token dictionary")
        bad = [k for k, v in tokens.items() if not isinstance(v, int) or v < 0]
        if bad:
            raise DataError(
                f"{token_path}: token ids must be non-negative integers; {bad[0]!r} maps to {tokens[bad[0]]!r}."
            )
        mapping_path = self._dictionary_path(
            self.ensembl_mapping_dictionary, "ensembl_mapping_dict", "Ensembl mapping"
        )
        mapping = load_dictionary(mapping_path, "Ensembl mapping") if mapping_path is not None else None
        medians = None
        median_path = None
        if self.gene_medians == "dictionary":
            median_path = self._dictionary_path(
                self.gene_median_dictionary, "gene_median_dictionary", "gene median"
            )
            if median_path is None:
                raise DataError(
                    f"{_WHO} needs gene medians: set tokenizer.params.gene_median_dictionary "
                    "(or dictionary_dir), or set tokenizer.params.gene_medians: fit to compute them from "
                    "the training cells."
                )
            medians = load_dictionary(median_path, "gene median")
            bad = [
                k
                for k, v in medians.items()
                if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0)
            ]
            if bad:
                raise DataError(
                    f"{median_path}: medians must be positive numbers; {bad[0]!r} has {medians[bad[0]]!r}."
                )
        files = {
            "token_dictionary": token_path,
            "ensembl_mapping_dictionary": mapping_path,
            "gene_median_dictionary": median_path,
        }
        self._check_model_series(tokens, token_path, {k: p for k, p in files.items() if p is not None})
        described = {k: {"name": p.name, "sha256": _sha256(p)} for k, p in files.items() if p is not None}
        fitted_with = getattr(self, "dictionary_files_", None)
        if fitted_with is not None and fitted_with != described:
            changed = sorted(
                k for k in set(fitted_with) | set(described) if fitted_with.get(k) != described.get(k)
            )
            raise DataError(
                f"{_WHO}: the {', '.join(k.replace('_', ' ') for k in changed)} changed since this tokenizer "
                f"was fitted (fitted with {fitted_with}, now {described}); its tokens would use other ids or "
                f"medians. Fit it again (for a run: `grnx cache clear --stage tokenize`, then rerun)."
            )
        self._loaded = {"tokens": tokens, "mapping": mapping, "medians": medians, "files": described}
        return self._loaded

    def _check_model_series(self, tokens: dict[str, int], token_path: Path, files: dict[str, Path]) -> None:
        """Refuse dictionaries of the other Geneformer series (their token ids mean other genes)."""
        version = self.model_version
        series = MODEL_SERIES[version]
        fix = (
            f"Set tokenizer.params.model_version to the series of the dictionaries, or point "
            f"tokenizer.params.dictionary_dir at the {series['dictionaries']} dictionaries "
            f"(../shared/data/geneformer/{version.lower()} holds them)."
        )
        present = [t for t in ("<cls>", "<eos>") if t in tokens]
        if version == "V1" and present:
            raise DataError(
                f"{_WHO}: model_version V1 (gc30M dictionaries, 2048 tokens, no special tokens), but the "
                f"token dictionary {token_path} holds {' and '.join(present)}: it is a V2 (gc95M/gc104M) "
                f"dictionary, whose token ids a V1 model cannot read. {fix}"
            )
        if version == "V2" and len(present) < 2:
            missing = " and ".join(t for t in ("<cls>", "<eos>") if t not in tokens)
            raise DataError(
                f"{_WHO}: model_version V2 (gc95M/gc104M dictionaries, 4096 tokens with <cls> and <eos>), "
                f"but the token dictionary {token_path} has no {missing}: it is a V1 (gc30M) dictionary. {fix}"
            )
        if version == "V1" and max(tokens.values()) >= V1_VOCABULARY_SIZE:
            raise DataError(
                f"{_WHO}: model_version V1, but the token dictionary {token_path} has token ids up to "
                f"{max(tokens.values())}, beyond a V1 model's vocabulary of {V1_VOCABULARY_SIZE:,} tokens. {fix}"
            )
        for kind, path in files.items():
            tag = _CORPUS_TAG.search(path.name)
            if tag is not None and tag.group(1) not in series["corpora"]:
                raise DataError(
                    f"{_WHO}: model_version {version} uses the {series['dictionaries']} dictionaries, but "
                    f"{kind.replace('_', ' ')} {path} is named for the gc{tag.group(1)}M corpus. {fix}"
                )

    def input_files(self) -> list[Path]:
        """The dictionary files the tokens depend on (their content should key a cache)."""
        files = [
            self._dictionary_path(self.token_dictionary, "token_dictionary", "token dictionary"),
            self._dictionary_path(self.ensembl_mapping_dictionary, "ensembl_mapping_dict", "Ensembl mapping"),
        ]
        if self.gene_medians == "dictionary":
            files.append(
                self._dictionary_path(self.gene_median_dictionary, "gene_median_dictionary", "gene median")
            )
        return [f for f in files if f is not None]

    def _settings(self) -> tuple[int, bool]:
        series = MODEL_SERIES[self.model_version]
        return self.model_input_size or series["input_size"], series["special_tokens"]

    # ---- the data's genes ----------------------------------------------------------------------

    def _gene_ids(self, adata: anndata.AnnData) -> np.ndarray:
        if self.gene_id_key is None:
            return np.asarray(adata.var_names, dtype=str)
        if self.gene_id_key not in adata.var.columns:
            raise DataError(
                f"{_WHO}: gene_id_key {self.gene_id_key!r} is not a var column "
                f"(var columns: {', '.join(map(str, adata.var.columns[:20])) or 'none'})."
            )
        return adata.var[self.gene_id_key].astype(str).to_numpy()

    def _slots(self, adata: anndata.AnnData, medians: dict[str, float] | None) -> _Slots:
        """Columns grouped into slots (the genes Geneformer ranks), by the rules of the docstring.

        A slot is one column, or (when Geneformer sums) all columns of one gene; slots are
        numbered in Geneformer's gene order: single columns in column order, then summed genes in
        the order of their first column. ``medians`` None: every gene with a token is kept.
        """
        dictionaries = self._dictionaries()
        tokens, mapping = dictionaries["tokens"], dictionaries["mapping"]
        ids = self._gene_ids(adata).tolist()
        special = {k for k in tokens if k.startswith("<") and k.endswith(">")}
        where = "var_names" if self.gene_id_key is None else f"var[{self.gene_id_key!r}]"
        if not self.collapse_gene_ids:
            in_dictionary = [i for i in ids if i in tokens]
            repeated = [i for i, count in Counter(in_dictionary).items() if count > 1]
            if repeated:
                raise DataError(
                    f"{_WHO}: {len(repeated)} ids of the token dictionary appear in several columns of "
                    f"{where} (first: {', '.join(repeated[:3])}), and collapse_gene_ids is false; Geneformer "
                    f"refuses this too ('data Ensembl IDs non-unique'). Set tokenizer.params."
                    f"collapse_gene_ids: true (Geneformer's default) to map and combine them, or remove "
                    f"the duplicated columns."
                )
            mapped = [i if i in tokens else None for i in ids]
            summing = False
        else:
            if mapping is None:
                usable = {k: k for k in tokens}
            else:
                usable = {k: v for k, v in mapping.items() if v in tokens}
            in_mapping = [i for i in ids if i in usable]
            many_to_one = len(set(in_mapping)) != len({usable[i] for i in in_mapping})
            summing = many_to_one or self.duplicate_ids == "sum"
            mapped = [usable.get(i.upper()) for i in ids]
        mapped = [None if m in special else m for m in mapped]
        without_median = sorted(
            {m for m in mapped if m is not None and medians is not None and m not in medians}
        )
        if without_median and self.gene_medians == "dictionary":
            raise DataError(
                f"{_WHO}: {len(without_median)} genes of the data have a token but no median in the gene "
                f"median dictionary (first: {', '.join(without_median[:3])}); Geneformer fails on them "
                f"(KeyError). The token and median dictionaries must come from the same Geneformer "
                f"series: check tokenizer.params.gene_median_dictionary / dictionary_dir."
            )
        n_without_median = 0
        if without_median:
            dropped = set(without_median)
            n_without_median = sum(m in dropped for m in mapped)
            mapped = [None if m in dropped else m for m in mapped]
        n_tokenised = sum(m is not None for m in mapped)
        if n_tokenised == 0:
            looks = sum(bool(_ENSEMBL.match(i)) for i in ids)
            raise DataError(
                f"{_WHO} needs Ensembl IDs in var; {looks} of {len(ids)} {where} look like "
                f"Ensembl IDs and none maps to a token of the {self.model_version} dictionary (first ids: "
                f"{', '.join(ids[:3])}). Add a gene-id mapping preprocessor, or set "
                f"tokenizer.params.gene_id_key to a var column holding Ensembl IDs."
            )
        per_gene = Counter(m for m in mapped if m is not None)
        col_slot = np.full(len(ids), -1, dtype=np.int64)
        slot_gene: list[str] = []
        if summing:
            repeated_genes = [g for g, count in per_gene.items() if count > 1]  # order of first column
            summed = set(repeated_genes)
            for column, gene in enumerate(mapped):
                if gene is not None and gene not in summed:
                    col_slot[column] = len(slot_gene)
                    slot_gene.append(gene)
            n_single = len(slot_gene)
            first = {gene: n_single + k for k, gene in enumerate(repeated_genes)}
            for column, gene in enumerate(mapped):
                if gene in first:
                    col_slot[column] = first[gene]
            slot_gene.extend(repeated_genes)
        else:
            for column, gene in enumerate(mapped):
                if gene is not None:
                    col_slot[column] = len(slot_gene)
                    slot_gene.append(gene)
            n_single = len(slot_gene)
        n_repeated = sum(count - 1 for count in per_gene.values())
        facts = {
            "n_var": len(ids),
            "n_var_tokenised": n_tokenised,
            "n_genes_tokenised": len(per_gene),
            "duplicate_ids": "summed" if summing else "kept",
            "n_var_summed_into_other_columns": n_repeated if summing else 0,
            "n_var_duplicating_other_columns": n_repeated,
            "n_var_without_median": n_without_median,
        }
        return _Slots(col_slot=col_slot, n_single=n_single, slot_gene=slot_gene, facts=facts)

    def _counts_data(self, adata: anndata.AnnData) -> anndata.AnnData:
        """The cells x genes the tokens come from: ``adata``, or its ``raw`` for ``layer: raw``."""
        from grnx_plugins.tokenizers._streaming import raw_as_data

        return raw_as_data(adata, _WHO) if self.layer == "raw" else adata

    def _source_name(self, layer: str | None) -> str:
        if self.layer == "raw":
            return "raw.X"
        return "X" if layer is None else f"layers[{layer!r}]"

    def _layer(self, adata: anndata.AnnData) -> str | None:
        if self.layer == "raw":
            return None  # _counts_data made raw.X the X
        if self.layer is not None:
            return self.layer
        return "counts" if "counts" in adata.layers else None

    # ---- the data's cells ----------------------------------------------------------------------

    def _filter_pass(self, obs: pd.DataFrame) -> tuple[np.ndarray, dict[str, Any]]:
        """Rows where ``obs[filter_pass_key] == 1``, as Geneformer compares them (or every row)."""
        key = self.filter_pass_key
        if key not in obs.columns:
            return np.arange(len(obs)), {"n_cells_filtered_out": 0}
        column = obs[key]
        dtype = column.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            categories = dtype.categories
            if not (
                pd.api.types.is_numeric_dtype(categories.dtype)
                or pd.api.types.is_bool_dtype(categories.dtype)
            ):
                self._refuse_strings(column, key)
            codes = column.cat.codes.to_numpy()
            passing = np.asarray(categories == 1, dtype=bool)
            keep = np.where(codes >= 0, passing[np.maximum(codes, 0)], False)
        elif pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_numeric_dtype(dtype):
            keep = (column == 1).fillna(False).to_numpy(dtype=bool)
        else:
            if any(isinstance(v, (str, bytes)) for v in column):
                self._refuse_strings(column, key)
            keep = np.array([_equals_one(v) for v in column], dtype=bool)
        positions = np.flatnonzero(keep)
        if len(positions) == 0:
            values = ", ".join(map(repr, pd.unique(column)[:5]))
            raise DataError(
                f"{_WHO}: obs[{key!r}] equals 1 in none of the {len(obs)} cells (values: {values}), so no "
                f"cell would be tokenised (Geneformer keeps the cells where it is 1). Fix the column, or "
                f"rename it if it is not a filter."
            )
        return positions, {"n_cells_filtered_out": int(len(obs) - len(positions))}

    @staticmethod
    def _refuse_strings(column: pd.Series, key: str) -> None:
        example = next((v for v in column if isinstance(v, (str, bytes))), None)
        if example is None and isinstance(column.dtype, pd.CategoricalDtype):
            example = column.cat.categories[0] if len(column.cat.categories) else None
        raise DataError(
            f"{_WHO}: obs[{key!r}] holds strings (e.g. {example!r}); Geneformer keeps the cells whose "
            f"value equals the number 1, so a column of strings keeps none. Convert it to numbers "
            f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(int)) or to booleans, or set "
            f"tokenizer.params.filter_pass_key to another column."
        )

    def _n_counts(
        self, obs: pd.DataFrame, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.dtype, dict[str, Any]]:
        """Totals of the kept cells as float64, their reciprocals as numpy computes them in the
        column's dtype (also float64), that dtype, and facts. NaN totals: use the row sums."""
        key = self.n_counts_key
        if key is None:
            nan = np.full(len(positions), np.nan)
            return nan, nan, np.dtype(np.float64), {"n_counts_source": "row sums (n_counts_key: null)"}
        if key not in obs.columns:
            raise DataError(
                f"{_WHO} needs each cell's total count in obs[{key!r}], as Geneformer does (it requires "
                f"the column and never computes it); the data has no such column (obs columns: "
                f"{', '.join(map(str, obs.columns[:20])) or 'none'}). Add it: the sum of each cell's raw "
                f"counts over all genes, before any gene filtering (e.g. adata.obs[{key!r}] = "
                f"np.asarray(adata.X.sum(axis=1)).ravel()), set tokenizer.params.n_counts_key to the column "
                f"holding it, or set tokenizer.params.n_counts_key: null to use the row sums of the matrix "
                f"tokenised."
            )
        column = obs[key]
        dtype = column.dtype
        numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
        if not numeric or isinstance(dtype, pd.CategoricalDtype):
            raise DataError(
                f"{_WHO}: obs[{key!r}] must hold each cell's total count as numbers; found dtype {dtype}. "
                f"Convert it (e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype('float64'))."
            )
        if isinstance(dtype, np.dtype):
            values = column.to_numpy()[positions]
        else:  # a pandas nullable dtype: missing values become NaN
            values = column.to_numpy(dtype=np.float64, na_value=np.nan)[positions]
        bad = ~np.isfinite(values.astype(np.float64))
        if bad.any():
            first = obs.index[positions[np.flatnonzero(bad)[0]]]
            raise DataError(
                f"{_WHO}: obs[{key!r}] is missing (NaN) or infinite for {int(bad.sum())} of the "
                f"{len(positions)} cells tokenised (first: cell {first!r}); Geneformer would rank such "
                f"cells by NaN values. Fill in those totals, drop those cells, or set "
                f"tokenizer.params.n_counts_key: null to use the row sums."
            )
        with np.errstate(divide="ignore"):
            recip = np.divide(1, values)  # Geneformer divides sparse counts by multiplying with this
        facts = {"n_counts_source": f"obs[{key!r}]", "n_counts_dtype": str(values.dtype)}
        return values.astype(np.float64), recip.astype(np.float64), recip.dtype, facts

    # ---- fit / transform -----------------------------------------------------------------------

    def fit(self, adata: anndata.AnnData) -> RankValue:
        """Load the dictionaries; with ``gene_medians: fit``, compute the medians from ``adata``."""
        adata = self._counts_data(adata)
        self.__dict__.pop("dictionary_files_", None)  # refitting: the files as they are now
        dictionaries = self._dictionaries()
        self.dictionary_files_ = dictionaries["files"]
        if self.gene_medians == "dictionary":
            return self
        from grnx_plugins.tokenizers import _kernels
        from grnx_plugins.tokenizers._streaming import matrix_reader

        slots = self._slots(adata, None)
        genes = list(dict.fromkeys(slots.slot_gene))
        index = {g: i for i, g in enumerate(genes)}
        gene_of_slot = np.array([index[g] for g in slots.slot_gene], dtype=np.int64)
        layer = self._layer(adata)
        reader = matrix_reader(adata, layer, _WHO)
        positions, _ = self._filter_pass(adata.obs)
        n_counts, recip, counts_dtype, _ = self._n_counts(adata.obs, positions)
        single = _single_precision(reader.dtype, counts_dtype)
        source = self._source_name(layer)

        def passes():
            for start in range(0, len(positions), self.chunk_size):
                rows = positions[start : start + self.chunk_size]
                block = reader.read(rows)
                slot_of, values, flags, bad_row, bad_value = _kernels.normalised_by_slot(
                    block.indptr.astype(np.int64),
                    block.indices,
                    block.data,
                    n_counts[start : start + self.chunk_size],
                    recip[start : start + self.chunk_size],
                    slots.col_slot,
                    slots.n_single,
                    len(slots.slot_gene),
                    TARGET_SUM,
                    single,
                    True,
                )
                problem = _describe_flags(flags, source)
                if problem is not None:
                    raise DataError(problem.format(cell=adata.obs_names[rows[bad_row]], value=bad_value))
                yield gene_of_slot[slot_of], values

        medians = exact_nonzero_medians(passes, len(genes), self.median_memory_values)
        self.gene_medians_ = {gene: float(m) for gene, m in zip(genes, medians) if np.isfinite(m)}
        if not self.gene_medians_:
            raise DataError(
                f"{_WHO}: no gene is expressed in the training cells, so no median "
                "can be computed. Check the data and the train split."
            )
        return self

    def transform(
        self,
        adata: anndata.AnnData,
        obs_columns: list[str] | None = None,
        *,
        path: str | Path | None = None,
    ) -> TokenizedCells:
        """Rank-value tokens of the cells of ``adata``; streamed to ``path`` when given."""
        from grnx_plugins.tokenizers._streaming import matrix_reader, tokenize_rows

        adata = self._counts_data(adata)

        dictionaries = self._dictionaries()
        medians = getattr(self, "gene_medians_", None)
        if medians is None:
            if self.gene_medians == "fit":
                raise DataError(f"{_WHO} with gene_medians: fit must be fitted before transform.")
            medians = dictionaries["medians"]
        tokens = dictionaries["tokens"]
        max_length, special = self._settings()
        cls_id = int(tokens["<cls>"]) if special else -1
        eos_id = int(tokens["<eos>"]) if special else -1
        max_genes = max_length - (2 if special else 0)
        slots = self._slots(adata, medians)
        layer = self._layer(adata)
        reader = matrix_reader(adata, layer, _WHO)
        positions, cell_facts = self._filter_pass(adata.obs)
        n_counts, recip, counts_dtype, count_facts = self._n_counts(adata.obs, positions)
        single = _single_precision(reader.dtype, counts_dtype)
        slot_median = np.array([medians[g] for g in slots.slot_gene], dtype=np.float64)
        plan = _RankPlan(
            col_slot=slots.col_slot,
            n_single=slots.n_single,
            slot_token=np.array([tokens[g] for g in slots.slot_gene], dtype=np.int32),
            slot_recip_median=np.divide(1, slot_median),
            max_genes=max_genes,
            cls_id=cls_id,
            eos_id=eos_id,
            single=single,
            drop_empty=self.drop_empty_cells,
            source=self._source_name(layer),
        )
        vocabulary = [""] * (max(tokens.values()) + 1)
        for key, token in tokens.items():
            vocabulary[token] = key
        special_ids = sorted(int(v) for k, v in tokens.items() if k.startswith("<") and k.endswith(">"))
        metadata = {
            "tokenizer": self.name,
            "model_version": self.model_version,
            "model_input_size": max_length,
            "special_tokens": special,
            "pad_id": int(tokens.get("<pad>", 0)),
            "mask_id": int(tokens.get("<mask>", 1)),
            "cls_id": cls_id if special else None,
            "eos_id": eos_id if special else None,
            "special_ids": special_ids,
            "pad_value": 0.0,
            "vocab_size": len(vocabulary),
            "gene_medians": self.gene_medians,
            "dictionaries": dictionaries["files"],
            "layer": plan.source,
            "collapse_gene_ids": self.collapse_gene_ids,
            "normalisation": {
                "precision": "float32" if single else "float64",
                "operations": "x * (1 / n_counts) * 10000 * (1 / median)",
            },
            "tie_break": "stable: equal values keep Geneformer's gene order (columns, then summed genes)",
            **slots.facts,
            "n_cells_input": int(adata.n_obs),
            **cell_facts,
            **count_facts,
        }
        return tokenize_rows(
            adata,
            who=_WHO,
            kernel=_rank_value_kernel,
            plan=plan,
            reader=reader,
            positions=positions,
            per_row={"n_counts": n_counts, "recip_counts": recip},
            chunk_size=self.chunk_size,
            n_workers=self.n_workers,
            with_values=False,
            obs_columns=obs_columns,
            vocabulary=vocabulary,
            metadata=metadata,
            path=path,
        )

    def write_artifacts(self, tokens: Path, folder: Path) -> dict[str, Path]:
        """Files to log beside the tokens of a run, by artifact path: with ``export: geneformer``,
        Geneformer's ``.dataset`` of the token folder ``tokens`` (written in ``folder``), logged as
        the artifact folder ``tokens/geneformer.dataset``."""
        if self.export is None:
            return {}
        written = self.export_tokens(tokens, Path(folder) / "geneformer.dataset", format=self.export)
        return {"tokens/geneformer.dataset": written}

    @classmethod
    def export_tokens(
        cls,
        tokens: TokenizedCells | str | Path,
        path: str | Path,
        *,
        format: str = "geneformer",
        columns: list[str] | None = None,
        rename: dict[str, str] | None = None,
    ) -> Path:
        """Write rank-value tokens (a TokenizedCells or token folder) as ``format``: ``geneformer``,
        the ``.dataset`` of Geneformer's ``tokenize_data`` (``[input_ids, <columns>, length]``,
        input_ids int16 for V1 and int32 for V2), ``columns`` (default: all carried) named by
        ``rename`` (obs column -> dataset column). Used by ``grnx export tokens``."""
        from grnx_plugins.tokenizers.export import to_geneformer_dataset

        if format != "geneformer":
            raise DataError(f"{_WHO} exports tokens as 'geneformer' only, not {format!r}.")
        return to_geneformer_dataset(tokens, path, columns=columns, rename=rename)


def _equals_one(value: Any) -> bool:
    """``value == 1`` as Python compares it, with missing values (None, NaN, pd.NA) unequal."""
    if value is None or value is pd.NA:
        return False
    try:
        return bool(value == 1)
    except (TypeError, ValueError):
        return False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exact_nonzero_medians(passes, n_genes: int, memory_values: int) -> np.ndarray:
    """Exact per-gene median of the values ``passes()`` yields as ``(gene, value)`` chunks.

    Values must be positive (non-zero expression), so their float64 bit patterns order like the
    values. The first pass counts values per gene (keeping them when they fit in
    ``memory_values``); later passes narrow, per gene, the range of bit patterns holding the middle
    rank(s) with 256-bin histograms until the values inside all ranges fit in memory (or stop
    shrinking: at most the two middle values and their equals per gene), then collect those and
    pick the middle. NaN for genes without values. Matches ``np.median`` per gene.
    """
    counts = np.zeros(n_genes, dtype=np.int64)
    low = np.full(n_genes, np.iinfo(np.int64).max, dtype=np.int64)
    high = np.zeros(n_genes, dtype=np.int64)
    kept_genes: list[np.ndarray] = []
    kept_values: list[np.ndarray] = []
    total = 0
    for genes, values in passes():
        bits = values.view(np.int64)
        counts += np.bincount(genes, minlength=n_genes)
        np.minimum.at(low, genes, bits)
        np.maximum.at(high, genes, bits)
        total += len(values)
        if total <= memory_values:
            kept_genes.append(genes)
            kept_values.append(values)
        else:
            kept_genes, kept_values = [], []
    first = (counts - 1) // 2  # the two middle ranks (equal for odd counts)
    second = counts // 2
    if total <= memory_values:
        return _middle_of(
            np.concatenate(kept_genes) if kept_genes else np.zeros(0, np.int64),
            np.concatenate(kept_values) if kept_values else np.zeros(0),
            counts,
            np.zeros(n_genes, dtype=np.int64),
            first,
            second,
        )
    below = np.zeros(n_genes, dtype=np.int64)  # values under `low`, per gene
    inside = counts.copy()
    n_bins = 256
    # A gene whose range has shrunk to one bit pattern has its median: that value. A range holding
    # two adjacent distinct values (even counts) stops shrinking; then its few values are collected.
    previous = None
    while True:
        open_genes = (counts > 0) & (low < high)
        remaining = int(inside[open_genes].sum())
        if remaining <= memory_values or remaining == previous:
            break
        previous = remaining
        width = ((high - low) // n_bins) + 1
        histogram = np.zeros(n_genes * n_bins, dtype=np.int64)
        for genes, values in passes():
            bits = values.view(np.int64)
            within = open_genes[genes] & (bits >= low[genes]) & (bits <= high[genes])
            g = genes[within]
            histogram += np.bincount(
                g * n_bins + (bits[within] - low[g]) // width[g], minlength=n_genes * n_bins
            )
        rows = np.flatnonzero(open_genes)
        cumulative = np.cumsum(histogram.reshape(n_genes, n_bins)[rows], axis=1)
        bin_first = np.array(
            [np.searchsorted(c, f, side="right") for c, f in zip(cumulative, first[rows] - below[rows])]
        )
        bin_second = np.array(
            [np.searchsorted(c, f, side="right") for c, f in zip(cumulative, second[rows] - below[rows])]
        )
        positions = np.arange(len(rows))
        before = np.where(bin_first > 0, cumulative[positions, np.maximum(bin_first - 1, 0)], 0)
        new_low = low[rows] + bin_first * width[rows]
        new_high = np.minimum(low[rows] + (bin_second + 1) * width[rows] - 1, high[rows])
        below[rows] += before
        inside[rows] = cumulative[positions, bin_second] - before
        low[rows], high[rows] = new_low, new_high
    open_genes = (counts > 0) & (low < high)
    collected_genes, collected_values = [], []
    for genes, values in passes():
        bits = values.view(np.int64)
        within = open_genes[genes] & (bits >= low[genes]) & (bits <= high[genes])
        collected_genes.append(genes[within])
        collected_values.append(values[within])
    medians = _middle_of(
        np.concatenate(collected_genes),
        np.concatenate(collected_values),
        np.where(open_genes, counts, 0),
        below,
        first,
        second,
    )
    settled = (counts > 0) & (low == high)
    medians[settled] = low[settled].view(np.float64)
    return medians


def _middle_of(
    genes: np.ndarray,
    values: np.ndarray,
    counts: np.ndarray,
    below: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
) -> np.ndarray:
    """Per gene, the mean of the values of rank ``first`` and ``second`` (ranks counted from the
    gene's smallest value; ``below`` values lie under the collected ones)."""
    n_genes = len(counts)
    order = np.lexsort((values, genes))
    genes, values = genes[order], values[order]
    starts = np.searchsorted(genes, np.arange(n_genes))
    medians = np.full(n_genes, np.nan)
    present = counts > 0
    a = values[starts[present] + first[present] - below[present]]
    b = values[starts[present] + second[present] - below[present]]
    medians[present] = (a + b) / 2  # np.median's mean of the two middle values
    return medians
