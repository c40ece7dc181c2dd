"""CelluFormer: a permutation-invariant transformer that tells disease cells from control cells."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from grnx_core.components import ComponentParams
from grnx_plugins.models._base import TokenModel
from grnx_plugins.models._gene_embeddings import GeneEmbeddings

if TYPE_CHECKING:
    from grnx_core.data_types import TokenizedCells

WEIGHTS_FILE = "model.safetensors"


class CelluFormer(GeneEmbeddings, TokenModel):
    """CelluFormer (Wu et al., NeurIPS 2024, "Weighted Diversified Sampling").

    Reads expression-scaled tokens (``expression_scaled`` tokenizer): gene ids with expression
    values. Gene embedding (padding row zero) x expression value, ``n_layers`` encoder blocks
    without positional encoding under a key-padding mask, mean pooling over the real genes, a
    linear classifier. Paper settings: d_model 128, 4 blocks, 8 heads, feed-forward 512, dropout
    0.1; Adam, learning rate 1e-5, batch 128, 3 epochs ('High' AD vs 'Not AD').

    Differences from the published code (which the paper's description does not share): genes
    are embedded with their own token ids (the code shifted them by one), mean pooling excludes
    padding (the code averaged over padding too), and attention maps come from each block's own
    input (the code fed every block the embedding output). Embeddings are initialised N(0, 1)
    (the code drew them from U(-1/V, 1/V), which with V = 36,601 genes starts every cell near zero).

    ``embed(tokens, layer=None)``: mean over genes of encoder block ``layer``'s output (default
    the last block, i.e. the classifier's input; 0 = the scaled embeddings).
    ``input_gene_embeddings``: rows of the gene-embedding table, before scaling by the value;
    ``contextual_gene_embeddings``: each gene token's output of block ``layer`` in its cell.
    """

    name = "celluformer"
    description = "Permutation-invariant transformer classifier on expression-scaled gene tokens (WDS paper)."
    reference = "https://arxiv.org/abs/2410.15616"

    class Params(ComponentParams):
        d_model: int = Field(128, ge=1, description="width of gene embeddings and hidden states")
        n_layers: int = Field(4, ge=1, description="number of encoder blocks")
        n_heads: int = Field(8, ge=1, description="attention heads per block (must divide d_model)")
        d_ff: int = Field(512, ge=1, description="feed-forward width inside each block")
        dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout in attention and feed-forward")
        norm_first: bool = Field(
            False, description="pre-norm blocks (LayerNorm before attention); the paper uses post-norm"
        )

    def _build_network(self, info: dict[str, Any], n_classes: int, tokens: TokenizedCells) -> Any:
        from grnx_plugins.models._celluformer_net import CelluFormerNet

        if self.d_model % self.n_heads:
            from grnx_core.errors import GrnxError

            raise GrnxError(
                f"celluformer: d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})."
            )
        return CelluFormerNet(
            vocab_size=info["vocab_size"],
            n_classes=n_classes,
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_ff=self.d_ff,
            dropout=self.dropout,
            pad_id=info["pad_id"],
            norm_first=self.norm_first,
        )

    def _save_network(self, folder: Path) -> dict[str, Any]:
        from safetensors.torch import save_file

        state = {key: value.detach().cpu().contiguous() for key, value in self.network_.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        return {"weights": WEIGHTS_FILE}

    def _load_network(self, folder: Path, meta: dict[str, Any]) -> Any:
        from safetensors.torch import load_file

        network = self._build_network(meta["token_info"], len(meta["classes"]), None)
        network.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return network
