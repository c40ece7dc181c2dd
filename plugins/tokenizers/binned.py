"""scGPT's binned-value tokens: gene tokens with per-cell quantile bins of their expression."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, DataError, TokenizedCells, Tokenizer

if TYPE_CHECKING:
    import anndata
    import scipy.sparse as sp

    from grnx_plugins.tokenizers._streaming import ChunkTokens

SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")


@dataclass
class _BinnedPlan:
    col_token: np.ndarray  # input column -> token id, -1 when the gene is not in the vocabulary
    quantiles: np.ndarray  # np.linspace(0, 1, n_bins - 1)
    cls_id: int
    max_length: int
    spread_ties: bool
    random_truncation: bool
    source: str


def _binned_kernel(plan: _BinnedPlan, block: sp.csr_matrix, per_row: dict[str, np.ndarray]) -> ChunkTokens:
    from grnx_plugins.tokenizers import _kernels
    from grnx_plugins.tokenizers._streaming import ChunkTokens

    ids, values, lengths, n_expressed, flags, bad_row, bad_value = _kernels.binned_chunk(
        block.indptr.astype(np.int64),
        block.indices,
        block.data,
        plan.col_token,
        per_row["seed"],
        plan.quantiles,
        plan.cls_id,
        plan.max_length,
        plan.spread_ties,
        plan.random_truncation,
    )
    result = ChunkTokens(
        input_ids=ids,
        values=values,
        lengths=lengths,
        counters={"n_cells_truncated": int((n_expressed > plan.max_length - 1).sum())},
    )
    result.flag_bad_value(
        flags,
        bad_row,
        bad_value,
        f"Tokenizer 'binned' needs non-negative expression in {plan.source} (scGPT bins non-zero "
        "values); cell {cell!r} has {kind} ({value}). Tokenise before a 'scale' step, or point "
        "the 'layer' parameter at counts or normalised values.",
    )
    return result


def load_vocabulary(path: str | Path) -> tuple[dict[str, int], Path]:
    """A scGPT ``vocab.json`` (token -> id), from the file or a checkpoint folder holding it."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "vocab.json"
    if not path.is_file():
        raise DataError(
            f"Tokenizer 'binned': vocabulary {str(path)!r} does not exist. Set vocab_path to a scGPT "
            f"checkpoint folder (with vocab.json) or to the vocab.json file."
        )
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"Tokenizer 'binned': {path} is not valid JSON ({error}).") from error
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in vocab.items()
    ):
        raise DataError(f"Tokenizer 'binned': {path} must map token names to non-negative integer ids.")
    missing = [t for t in ("<pad>", "<cls>") if t not in vocab]
    if missing:
        raise DataError(f"Tokenizer 'binned': {path} lacks the special token(s) {', '.join(missing)}.")
    return vocab, path


class Binned(Tokenizer):
    """scGPT's value binning (Cui et al., Nature Methods 2024).

    Per cell, the non-zero values of the genes in the vocabulary are binned into ``n_bins - 1``
    quantile bins of that cell's non-zero values (bin 0 is reserved for zero, so bins run
    1..n_bins-1): edges ``np.quantile(nonzero, np.linspace(0, 1, n_bins - 1))``, bin
    ``np.digitize(x, edges)``. As in scGPT's ``_digitize(side="both")``, a value equal to several
    edges (ties, common with counts) gets a uniformly random bin among them
    (``ceil(u * (right - left) + left)``); ``tie_binning: left`` keeps ``np.digitize``'s bin
    instead. Quantile bins depend only on each value's rank in its cell, so counts, normalised or
    log1p values give the same bins (up to rounding of edges that fall on a value). The sequence is ``<cls>`` (value 0) then (gene, bin) in gene
    order. Cells with more than ``max_length - 1`` genes keep a uniformly random subset (scGPT's
    ``pad_batch``) or, with ``truncation: highest``, the highest values. Padding: token ``<pad>``,
    value ``pad_value`` (-2); masked values use ``mask_value`` (-1).

    Randomness (tie spreading, random truncation) is drawn per cell from a hash of ``seed`` and
    the cell's name, so a cell gets the same tokens whatever other cells, chunking or workers.

    Vocabulary: a scGPT checkpoint's ``vocab.json`` (``vocab_path``; genes are matched by
    ``var[gene_key]`` or ``var_names``, usually symbols; genes outside it are dropped), else built
    in ``fit`` from the training genes: ``<pad>``, ``<cls>``, ``<eoc>``, then the genes.
    """

    name = "binned"
    description = "scGPT tokens: <cls> + genes with per-cell quantile bins of their expression (51 bins)."
    reference = "https://doi.org/10.1038/s41592-024-02201-0"
    __version__ = "1"

    class Params(ComponentParams):
        n_bins: int = Field(51, ge=3, description="number of bins including bin 0 for zero expression")
        max_length: int = Field(1200, ge=2, description="tokens per cell including <cls>")
        vocab_path: str | None = Field(
            None, description="scGPT vocab.json or checkpoint folder holding it; null: built from the data"
        )
        gene_key: str | None = Field(
            None, description="var column with gene names of the vocabulary; var_names when null"
        )
        layer: str | None = Field(None, description="layer with the expression to bin; X when null")
        tie_binning: Literal["spread", "left"] = Field(
            "spread",
            description="values equal to several edges: 'spread' a random one of those bins (scGPT), "
            "'left' np.digitize's bin",
        )
        truncation: Literal["random", "highest"] = Field(
            "random",
            description="which genes a cell longer than max_length keeps: a random subset (scGPT) "
            "or the highest values",
        )
        seed: int = Field(0, description="seed of the per-cell random choices (with the cell name)")
        pad_value: float = Field(-2.0, description="value of padding positions")
        mask_value: float = Field(-1.0, description="value of masked positions (masked value modelling)")
        chunk_size: int = Field(2048, ge=1, description="cells read and tokenised per chunk")
        n_workers: int = Field(1, ge=1, description="worker processes tokenising chunks in parallel")

    def _gene_names(self, adata: anndata.AnnData) -> pd.Index:
        if self.gene_key is None:
            return pd.Index(adata.var_names.astype(str))
        if self.gene_key not in adata.var.columns:
            raise DataError(
                f"Tokenizer 'binned': gene_key {self.gene_key!r} is not a var column "
                f"(var columns: {', '.join(map(str, adata.var.columns[:20])) or 'none'})."
            )
        return pd.Index(adata.var[self.gene_key].astype(str))

    def input_files(self) -> list[Path]:
        """The vocabulary file the tokens depend on (its content should key a cache)."""
        if self.vocab_path is None:
            return []
        path = Path(self.vocab_path).expanduser()
        return [path / "vocab.json" if path.is_dir() else path]

    def fit(self, adata: anndata.AnnData) -> Binned:
        """Load the checkpoint vocabulary, or build one from the genes of ``adata``."""
        if self.vocab_path is not None:
            self.vocab_, path = load_vocabulary(self.vocab_path)
            self.vocab_source_ = str(path)
        else:
            genes = [g for g in dict.fromkeys(self._gene_names(adata)) if g not in SPECIAL_TOKENS]
            self.vocab_ = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *genes])}
            self.vocab_source_ = "built from the data"
        return self

    def transform(
        self,
        adata: anndata.AnnData,
        obs_columns: list[str] | None = None,
        *,
        path: str | Path | None = None,
    ) -> TokenizedCells:
        """Binned tokens of the cells of ``adata``; streamed to ``path`` when given."""
        from grnx_plugins.tokenizers._streaming import cell_seeds, matrix_reader, tokenize_rows

        if getattr(self, "vocab_", None) is None:
            self.fit(adata)
        vocab = self.vocab_
        names = self._gene_names(adata)
        col_token = np.array([vocab.get(g, -1) for g in names], dtype=np.int64)
        col_token[np.isin(names, [t for t in vocab if t.startswith("<") and t.endswith(">")])] = -1
        if (col_token < 0).all():
            raise DataError(
                f"Tokenizer 'binned': none of the {len(names)} genes (first: {', '.join(names[:3])}) is in the "
                f"vocabulary ({self.vocab_source_}). scGPT vocabularies use gene symbols: set gene_key to a var "
                f"column holding symbols."
            )
        plan = _BinnedPlan(
            col_token=col_token,
            quantiles=np.linspace(0, 1, self.n_bins - 1),
            cls_id=int(vocab["<cls>"]),
            max_length=self.max_length,
            spread_ties=self.tie_binning == "spread",
            random_truncation=self.truncation == "random",
            source="X" if self.layer is None else f"layers[{self.layer!r}]",
        )
        vocabulary = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            vocabulary[i] = token
        metadata = {
            "tokenizer": self.name,
            "n_bins": self.n_bins,
            "max_length": self.max_length,
            "pad_id": int(vocab["<pad>"]),
            "cls_id": int(vocab["<cls>"]),
            "pad_value": self.pad_value,
            "mask_value": self.mask_value,
            "cls_value": 0.0,
            "special_ids": sorted(i for t, i in vocab.items() if t.startswith("<") and t.endswith(">")),
            "vocab_size": len(vocabulary),
            "vocabulary_source": self.vocab_source_,
            "tie_binning": self.tie_binning,
            "truncation": self.truncation,
            "seed": self.seed,
            "layer": plan.source,
            "n_var_in_vocabulary": int((col_token >= 0).sum()),
        }
        return tokenize_rows(
            adata,
            who="Tokenizer 'binned'",
            kernel=_binned_kernel,
            plan=plan,
            reader=matrix_reader(adata, self.layer, "Tokenizer 'binned'"),
            positions=np.arange(adata.n_obs),
            per_row={"seed": cell_seeds(adata.obs_names, self.seed)},
            chunk_size=self.chunk_size,
            n_workers=self.n_workers,
            with_values=True,
            obs_columns=obs_columns,
            vocabulary=vocabulary,
            metadata=metadata,
            path=path,
        )
