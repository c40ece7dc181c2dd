"""CelluFormer's expression-scaled tokens: a cell as the set of its expressed genes with their values."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, DataError, TokenizedCells, Tokenizer

if TYPE_CHECKING:
    import anndata
    import scipy.sparse as sp

    from grnx_plugins.tokenizers._streaming import ChunkTokens


@dataclass
class _ScaledPlan:
    col_token: np.ndarray  # input column -> token id, -1 when the gene is not in the vocabulary
    max_length: int
    source: str


def _expression_scaled_kernel(
    plan: _ScaledPlan, block: sp.csr_matrix, per_row: dict[str, np.ndarray]
) -> ChunkTokens:
    from grnx_plugins.tokenizers import _kernels
    from grnx_plugins.tokenizers._streaming import ChunkTokens

    ids, values, lengths, n_expressed, flags, bad_row, bad_value = _kernels.expression_scaled_chunk(
        block.indptr.astype(np.int64),
        block.indices,
        block.data,
        plan.col_token,
        plan.max_length,
    )
    result = ChunkTokens(
        input_ids=ids,
        values=values,
        lengths=lengths,
        counters={"n_cells_truncated": int((n_expressed > plan.max_length).sum())},
    )
    result.flag_bad_value(
        flags,
        bad_row,
        bad_value,
        f"Tokenizer 'expression_scaled' needs non-negative expression in {plan.source} (CelluFormer "
        "scales gene embeddings by it); cell {cell!r} has {kind} ({value}). Tokenise before a "
        "'scale' step, or point the 'layer' parameter at normalised, non-negative values.",
    )
    return result


class ExpressionScaled(Tokenizer):
    """A cell as the set of its expressed genes, each with its expression value (Wu et al., WDS).

    Token id = the gene's index in the fitted gene list + ``offset`` (ids below ``offset`` are
    reserved, 0 is ``<pad>``); value = the expression read from ``X`` or ``layer``, i.e. after the
    recipe's normalisation. The order carries no meaning (CelluFormer has no positional encoding);
    tokens are written in gene order. A cell with more than ``max_length`` expressed genes keeps
    the ``max_length`` highest values (ties: the gene that comes first). Models pad batches with
    ``TokenizedCells.padded`` and its mask, so padding never enters attention or pooling.

    ``fit`` records the gene list (``var_names``); ``transform`` maps genes by name, so cells
    tokenised later with other genes use the same ids (genes outside the fitted list are dropped).
    Without ``fit``, the genes of the data given to ``transform`` are used.
    """

    name = "expression_scaled"
    description = "CelluFormer tokens: expressed genes (gene index + offset) with their expression values."
    reference = "https://arxiv.org/abs/2410.15616"
    __version__ = "1"

    class Params(ComponentParams):
        max_length: int = Field(1024, ge=1, description="most genes per cell; the highest-expressed are kept")
        offset: int = Field(
            1, ge=1, description="token id of the first gene; ids below it are reserved (0 = <pad>)"
        )
        layer: str | None = Field(None, description="layer with the (normalised) expression; X when null")
        chunk_size: int = Field(2048, ge=1, description="cells read and tokenised per chunk")
        n_workers: int = Field(1, ge=1, description="worker processes tokenising chunks in parallel")

    def fit(self, adata: anndata.AnnData) -> ExpressionScaled:
        """Record the gene list that fixes the token ids."""
        self.genes_ = pd.Index(adata.var_names.astype(str))
        return self

    def _col_token(self, adata: anndata.AnnData, genes: pd.Index) -> np.ndarray:
        names = pd.Index(adata.var_names.astype(str))
        if names.equals(genes):
            return np.arange(len(names), dtype=np.int64) + self.offset
        if not genes.is_unique:
            raise DataError(
                "Tokenizer 'expression_scaled': the fitted gene list has duplicate names, so genes of new "
                "data cannot be matched by name. Make var_names unique (adata.var_names_make_unique())."
            )
        position = genes.get_indexer(names)
        if (position < 0).all():
            raise DataError(
                f"Tokenizer 'expression_scaled': none of the {len(names)} genes of the data is in the "
                f"{len(genes)} fitted genes (first: {', '.join(names[:3])} vs {', '.join(genes[:3])})."
            )
        return np.where(position >= 0, position + self.offset, -1).astype(np.int64)

    def transform(
        self,
        adata: anndata.AnnData,
        obs_columns: list[str] | None = None,
        *,
        path: str | Path | None = None,
    ) -> TokenizedCells:
        """Expression-scaled tokens of the cells of ``adata``; streamed to ``path`` when given."""
        from grnx_plugins.tokenizers._streaming import matrix_reader, tokenize_rows

        genes = getattr(self, "genes_", None)
        if genes is None:
            genes = pd.Index(adata.var_names.astype(str))
        plan = _ScaledPlan(
            col_token=self._col_token(adata, genes),
            max_length=self.max_length,
            source="X" if self.layer is None else f"layers[{self.layer!r}]",
        )
        reserved = ["<pad>"] + [f"<unused{i}>" for i in range(1, self.offset)]
        vocabulary = reserved + list(genes)
        metadata = {
            "tokenizer": self.name,
            "max_length": self.max_length,
            "offset": self.offset,
            "pad_id": 0,
            "pad_value": 0.0,
            "special_ids": list(range(self.offset)),
            "vocab_size": len(vocabulary),
            "layer": plan.source,
            "n_genes": len(genes),
            "n_var_outside_vocabulary": int((plan.col_token < 0).sum()),
        }
        return tokenize_rows(
            adata,
            who="Tokenizer 'expression_scaled'",
            kernel=_expression_scaled_kernel,
            plan=plan,
            reader=matrix_reader(adata, self.layer, "Tokenizer 'expression_scaled'"),
            positions=np.arange(adata.n_obs),
            per_row={},
            chunk_size=self.chunk_size,
            n_workers=self.n_workers,
            with_values=True,
            obs_columns=obs_columns,
            vocabulary=vocabulary,
            metadata=metadata,
            path=path,
        )
