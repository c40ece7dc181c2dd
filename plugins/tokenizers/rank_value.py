"""Geneformer rank-value tokenisation: each cell's genes ordered by median-scaled normalised expression."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from grnx_core import ComponentParams, DataError, TokenizedCells, Tokenizer

if TYPE_CHECKING:
    import anndata
    import scipy.sparse as sp

    from grnx_plugins.tokenizers._streaming import ChunkTokens

#: Geneformer's scaling of each cell to 10,000 counts before dividing by the gene medians.
TARGET_SUM = 10_000.0
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)
_DEFAULTS = {"V1": (2048, False), "V2": (4096, True)}


@dataclass
class _RankPlan:
    """What a worker needs to tokenise a row block (picklable)."""

    col_gene: np.ndarray  # input column -> gene index, -1 when the column is not tokenised
    gene_token: np.ndarray  # gene index -> token id
    gene_median: np.ndarray  # gene index -> normalisation factor
    max_genes: int
    cls_id: int
    eos_id: int
    drop_empty: bool
    source: str  # "X" or "layers['counts']", for messages


def _rank_value_kernel(plan: _RankPlan, block: sp.csr_matrix, per_row: dict[str, np.ndarray]) -> ChunkTokens:
    from grnx_plugins.tokenizers import _kernels
    from grnx_plugins.tokenizers._streaming import ChunkTokens

    ids, lengths, n_genes, flags, bad_row, bad_value = _kernels.rank_value_chunk(
        block.indptr.astype(np.int64),
        block.indices,
        block.data,
        per_row["n_counts"],
        plan.col_gene,
        plan.gene_token,
        plan.gene_median,
        plan.max_genes,
        plan.cls_id,
        plan.eos_id,
        TARGET_SUM,
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
            "Tokenizer 'rank_value': cell {cell!r} has expressed genes but a total count of {value}; "
            "obs['n_counts'] must hold each cell's total count (> 0). Fix or drop that column (the row "
            "sum is used when it is absent)."
        )
    else:
        return None
    return (
        f"Tokenizer 'rank_value' needs raw integer counts in {source}; cell {{cell!r}} has {found}. "
        f"Point the tokenizer's 'layer' parameter at the raw counts (data sources keep them in "
        f"layers['counts']), or tokenise before normalising."
    )


class RankValue(Tokenizer):
    """Geneformer's rank-value encoding (Theodoris et al., Nature 2023), V1 and V2 model series.

    For cell c with raw counts x and total ``n_counts`` (``obs["n_counts"]`` when present, else the
    row sum over all genes), every expressed gene g that has a token gets
    ``v_g = x_g / n_counts * 10_000 / median_g``; the genes are ordered by ``v_g`` descending and
    truncated to the model input: V1 (gc30M dictionaries) 2,048 genes, no special tokens; V2
    (gc95M/gc104M dictionaries) 4,094 genes between ``<cls>`` and ``<eos>``. Gene ids are
    upper-cased and mapped through the Ensembl mapping dictionary; counts of columns that map to the
    same gene are summed. Only cells with ``obs["filter_pass"] == 1`` are tokenised when that column
    exists; cells with no tokenisable gene are dropped (as Geneformer does) unless
    ``drop_empty_cells`` is false.

    Ties: Geneformer ranks with ``np.argsort(-v)`` (quicksort, not stable), so the order of genes
    with exactly equal ``v_g`` is arbitrary there. grnx sorts stably: equal values keep the order of
    their columns in ``adata.var`` (a gene summed from several columns takes the place of the first
    of them expressed in that cell). The output equals Geneformer's except for the order inside
    such tied groups (and, with float32 ``n_counts``, where Geneformer's float32 arithmetic rounds
    two distinct values to the same one or swaps near-equal ones; grnx computes in float64).

    Medians come from Geneformer's gene median dictionary, or (``gene_medians: fit``) from the
    training cells: the non-zero median of ``x / n_counts * 10_000`` per gene, computed exactly
    from chunk passes with memory bounded by ``median_memory_values``.

    Dictionaries are read from Geneformer's ``.pkl`` files with a restricted unpickler (plain
    dict/str/int/float and numpy scalars only; anything else is refused) or from TSV/JSON.

    Reads ``layer`` (default ``layers["counts"]`` when present, else ``X``), ``var[gene_id_key]``
    (default ``var_names``), ``obs["n_counts"]``, ``obs["filter_pass"]``. Streams row chunks of
    in-memory or backed AnnData, optionally in ``n_workers`` processes; pass ``path`` to
    :meth:`transform` to stream the tokens to disk instead of memory.
    """

    name = "rank_value"
    description = (
        "Geneformer rank-value encoding (V1 2048 tokens / V2 4096 with <cls>/<eos>) from raw counts."
    )
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    __version__ = "1"

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
            None, ge=3, description="tokens per cell including special tokens; default 2048 (V1) / 4096 (V2)"
        )
        special_tokens: bool | None = Field(
            None, description="add <cls> first and <eos> last; default false (V1) / true (V2)"
        )
        gene_id_key: str | None = Field(None, description="var column with Ensembl ids; var_names when null")
        layer: str | None = Field(
            None, description="layer with raw integer counts; null: layers['counts'] when present, else X"
        )
        n_counts_key: str = Field("n_counts", description="obs column with each cell's total count")
        filter_pass_key: str = Field(
            "filter_pass", description="obs column; only cells where it is 1 are kept"
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

    # ---- dictionaries ------------------------------------------------------------------------

    def _dictionary_path(self, explicit: str | None, prefix: str, what: str) -> Path | None:
        from grnx_plugins.tokenizers._dictionaries import find_dictionary

        if explicit is not None:
            return Path(explicit).expanduser()
        if self.dictionary_dir is not None:
            return find_dictionary(self.dictionary_dir, prefix, what)
        return None

    def _dictionaries(self) -> dict[str, Any]:
        cached = getattr(self, "dictionaries_", None)
        if cached is not None:
            return cached
        from grnx_plugins.tokenizers._dictionaries import load_dictionary

        token_path = self._dictionary_path(self.token_dictionary, "token_dictionary", "token dictionary")
        if token_path is None:
            raise DataError(
                "Tokenizer 'rank_value' needs Geneformer's token dictionary: set tokenizer.params."
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
                    "Tokenizer 'rank_value' needs gene medians: set tokenizer.params.gene_median_dictionary "
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
        self.dictionaries_ = {
            "tokens": tokens,
            "mapping": mapping,
            "medians": medians,
            "files": {k: {"name": p.name, "sha256": _sha256(p)} for k, p in files.items() if p is not None},
        }
        return self.dictionaries_

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
        size, special = _DEFAULTS[self.model_version]
        return (
            self.model_input_size or size,
            special if self.special_tokens is None else self.special_tokens,
        )

    # ---- mapping of the data's genes -----------------------------------------------------------

    def _gene_ids(self, adata: anndata.AnnData) -> np.ndarray:
        if self.gene_id_key is None:
            return np.asarray(adata.var_names, dtype=str)
        if self.gene_id_key not in adata.var.columns:
            raise DataError(
                f"Tokenizer 'rank_value': gene_id_key {self.gene_id_key!r} is not a var column "
                f"(var columns: {', '.join(map(str, adata.var.columns[:20])) or 'none'})."
            )
        return adata.var[self.gene_id_key].astype(str).to_numpy()

    def _map_genes(
        self, adata: anndata.AnnData, medians: dict[str, float] | None
    ) -> tuple[np.ndarray, list[str], dict]:
        """Column -> gene index (-1: no token / no median), the gene ids, and mapping facts."""
        dictionaries = self._dictionaries()
        tokens, mapping = dictionaries["tokens"], dictionaries["mapping"]
        ids = self._gene_ids(adata)
        upper = np.char.upper(ids.astype(str))
        special = {k for k in tokens if k.startswith("<") and k.endswith(">")}
        col_gene = np.full(len(ids), -1, dtype=np.int64)
        genes: list[str] = []
        index: dict[str, int] = {}
        n_without_median = 0
        for column, gene_id in enumerate(upper.tolist()):
            mapped = mapping.get(gene_id) if mapping is not None else gene_id
            if mapped is None or mapped not in tokens or mapped in special:
                continue
            if medians is not None and mapped not in medians:
                n_without_median += 1
                continue
            if mapped not in index:
                index[mapped] = len(genes)
                genes.append(mapped)
            col_gene[column] = index[mapped]
        n_mapped = int((col_gene >= 0).sum())
        if n_mapped == 0:
            looks = int(sum(bool(_ENSEMBL.match(i)) for i in ids.tolist()))
            where = "var_names" if self.gene_id_key is None else f"var[{self.gene_id_key!r}]"
            raise DataError(
                f"Tokenizer 'rank_value' needs Ensembl IDs in var; {looks} of {len(ids)} {where} look like "
                f"Ensembl IDs and none maps to a token of the {self.model_version} dictionary (first ids: "
                f"{', '.join(ids[:3].tolist())}). Add a gene-id mapping preprocessor, or set "
                f"tokenizer.params.gene_id_key to a var column holding Ensembl IDs."
            )
        facts = {
            "n_var": int(len(ids)),
            "n_var_tokenised": n_mapped,
            "n_genes_tokenised": len(genes),
            "n_var_summed_into_other_columns": n_mapped - len(genes),
            "n_var_without_median": n_without_median,
        }
        return col_gene, genes, facts

    def _layer(self, adata: anndata.AnnData) -> str | None:
        if self.layer is not None:
            return self.layer
        return "counts" if "counts" in adata.layers else None

    def _positions_and_counts(self, adata: anndata.AnnData) -> tuple[np.ndarray, np.ndarray, dict]:
        obs = adata.obs
        if self.filter_pass_key in obs.columns:
            keep = (obs[self.filter_pass_key] == 1).to_numpy()
            positions = np.flatnonzero(keep)
        else:
            positions = np.arange(adata.n_obs)
        if self.n_counts_key in obs.columns:
            try:
                counts = obs[self.n_counts_key].to_numpy(dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise DataError(
                    f"Tokenizer 'rank_value': obs[{self.n_counts_key!r}] must be numeric totals per cell; "
                    f"found {obs[self.n_counts_key].dtype}."
                ) from error
            source = f"obs[{self.n_counts_key!r}]"
        else:
            counts = np.full(adata.n_obs, np.nan)
            source = "row sums"
        facts = {
            "n_cells_input": int(adata.n_obs),
            "n_cells_filtered_out": int(adata.n_obs - len(positions)),
            "n_counts_source": source,
        }
        return positions, counts[positions], facts

    # ---- fit / transform -----------------------------------------------------------------------

    def fit(self, adata: anndata.AnnData) -> RankValue:
        """Load the dictionaries; with ``gene_medians: fit``, compute the medians from ``adata``."""
        dictionaries = self._dictionaries()
        if self.gene_medians == "dictionary":
            self.gene_medians_ = dictionaries["medians"]
            return self
        from grnx_plugins.tokenizers import _kernels
        from grnx_plugins.tokenizers._streaming import matrix_reader

        col_gene, genes, _ = self._map_genes(adata, None)
        layer = self._layer(adata)
        reader = matrix_reader(adata, layer, "Tokenizer 'rank_value'")
        positions, n_counts, _ = self._positions_and_counts(adata)
        source = "X" if layer is None else f"layers[{layer!r}]"

        def passes():
            for start in range(0, len(positions), self.chunk_size):
                rows = positions[start : start + self.chunk_size]
                block = reader.read(rows)
                genes_of, values, flags, bad_row, bad_value = _kernels.normalised_by_gene(
                    block.indptr.astype(np.int64),
                    block.indices,
                    block.data,
                    n_counts[start : start + self.chunk_size],
                    col_gene,
                    TARGET_SUM,
                    True,
                )
                problem = _describe_flags(flags, source)
                if problem is not None:
                    raise DataError(problem.format(cell=adata.obs_names[rows[bad_row]], value=bad_value))
                yield genes_of, values

        medians = exact_nonzero_medians(passes, len(genes), self.median_memory_values)
        self.gene_medians_ = {gene: float(m) for gene, m in zip(genes, medians) if np.isfinite(m)}
        if not self.gene_medians_:
            raise DataError(
                "Tokenizer 'rank_value': no gene is expressed in the training cells, so no median "
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

        dictionaries = self._dictionaries()
        medians = getattr(self, "gene_medians_", None)
        if medians is None:
            if self.gene_medians == "fit":
                raise DataError(
                    "Tokenizer 'rank_value' with gene_medians: fit must be fitted before transform."
                )
            medians = dictionaries["medians"]
        tokens = dictionaries["tokens"]
        max_length, special = self._settings()
        cls_id = eos_id = -1
        if special:
            missing = [t for t in ("<cls>", "<eos>") if t not in tokens]
            if missing:
                raise DataError(
                    f"Tokenizer 'rank_value': special_tokens needs {' and '.join(missing)} in the token "
                    f"dictionary, which has none (a V1 dictionary?). Use model_version: V1 or a V2 dictionary."
                )
            cls_id, eos_id = int(tokens["<cls>"]), int(tokens["<eos>"])
        max_genes = max_length - (2 if special else 0)
        if max_genes < 1:
            raise DataError(
                f"Tokenizer 'rank_value': model_input_size {max_length} leaves no room for genes."
            )
        col_gene, genes, gene_facts = self._map_genes(adata, medians)
        layer = self._layer(adata)
        plan = _RankPlan(
            col_gene=col_gene,
            gene_token=np.array([tokens[g] for g in genes], dtype=np.int32),
            gene_median=np.array([medians[g] for g in genes], dtype=np.float64),
            max_genes=max_genes,
            cls_id=cls_id,
            eos_id=eos_id,
            drop_empty=self.drop_empty_cells,
            source="X" if layer is None else f"layers[{layer!r}]",
        )
        positions, n_counts, cell_facts = self._positions_and_counts(adata)
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
            "tie_break": "stable: equal values keep adata.var column order",
            **gene_facts,
            **cell_facts,
        }
        return tokenize_rows(
            adata,
            who="Tokenizer 'rank_value'",
            kernel=_rank_value_kernel,
            plan=plan,
            reader=matrix_reader(adata, layer, "Tokenizer 'rank_value'"),
            positions=positions,
            per_row={"n_counts": n_counts},
            chunk_size=self.chunk_size,
            n_workers=self.n_workers,
            with_values=False,
            obs_columns=obs_columns,
            vocabulary=vocabulary,
            metadata=metadata,
            path=path,
        )


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
