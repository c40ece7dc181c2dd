"""Geneformer: a BERT over rank-value gene tokens, fine-tuned for cell classification."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from grnx_core.components import ComponentParams
from grnx_core.errors import DataError, GrnxError
from grnx_plugins.models._base import TokenModel
from grnx_plugins.models._gene_embeddings import GeneEmbeddings

if TYPE_CHECKING:
    from grnx_core.context import RunContext
    from grnx_core.data_types import TokenizedCells

HF_FOLDER = "hf"


class Geneformer(GeneEmbeddings, TokenModel):
    """Geneformer (Theodoris et al., Nature 2023; V2: Chen et al., bioRxiv 2024).

    Hugging Face ``BertForSequenceClassification`` on rank-value tokens (``rank_value``
    tokenizer). With ``checkpoint`` it loads a local Geneformer folder (``config.json`` plus
    weights, e.g. ``gf-6L-30M-i2048`` or ``gf-12L-104M-i4096`` downloaded from
    huggingface.co/ctheodoris/Geneformer) with ``from_pretrained(local_files_only=True)``:
    nothing is downloaded at run time. Without one it starts from random weights in the
    ``architecture`` configuration (V1: 6 layers, hidden 256, 4 heads, intermediate 512, 2048
    positions; V2-104M: 12/768/12/3072, 4096 positions; ReLU, dropout 0.02), which the size fields
    below may shrink for quick runs; its vocabulary is the tokens' (25,426 for the V1 and 20,275
    for the V2 dictionaries).

    Fine-tuning freezes the first ``freeze_layers`` encoder layers (as Geneformer's classifier
    does; the embeddings stay trainable). ``pretrain_epochs > 0`` first continues masked-LM
    pretraining (``mask_probability`` of the gene tokens) on the training cells; with no label
    column the model is only pretrained. Cell embeddings are the mean of the gene-token states of
    ``hidden_states[embedding_layer]`` excluding ``<cls>``/``<eos>`` and padding
    (``embedding_layer=-2`` is the penultimate layer, Geneformer's default ``emb_layer=-1``).
    Attention maps: the ``BertLayer``s run one at a time and a chosen layer's self-attention is
    computed from its weights block by block (no layer's full head maps are held; equal to
    Hugging Face's eager ``output_attentions``).
    ``input_gene_embeddings``: rows of BERT's word-embedding table (before position embeddings and
    the embedding LayerNorm); ``contextual_gene_embeddings``: each gene token's
    ``hidden_states[layer]`` in its cell (Geneformer's own gene embeddings use the penultimate, -2).
    """

    name = "geneformer"
    description = (
        "Geneformer BERT (V1 / V2-104M) fine-tuned for cell classification; loads local checkpoints."
    )
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    label_optional = True

    class Params(ComponentParams):
        checkpoint: str | None = Field(
            None,
            description="local Geneformer checkpoint folder (config.json + weights); None = random init",
        )
        architecture: Literal["v1", "v2-104m"] = Field(
            "v1", description="configuration for random initialisation when no checkpoint is given"
        )
        n_layers: int | None = Field(
            None, ge=1, description="override the number of layers (random init only)"
        )
        hidden_size: int | None = Field(None, ge=1, description="override the hidden size (random init only)")
        n_heads: int | None = Field(None, ge=1, description="override the attention heads (random init only)")
        intermediate_size: int | None = Field(
            None, ge=1, description="override the feed-forward size (random init only)"
        )
        max_positions: int | None = Field(
            None, ge=1, description="override the input size (random init only)"
        )
        dropout: float | None = Field(
            None, ge=0.0, lt=1.0, description="hidden and attention dropout; None keeps the config's (0.02)"
        )
        freeze_layers: int = Field(
            0,
            ge=0,
            description="freeze the first N encoder layers during fine-tuning; 0 = train.freeze_layers",
        )
        pretrain_epochs: int = Field(
            0, ge=0, description="epochs of masked-LM pretraining before fine-tuning"
        )
        mask_probability: float = Field(
            0.15, gt=0.0, lt=1.0, description="share of gene tokens masked in pretraining"
        )
        embedding_layer: int = Field(
            -2,
            description="hidden state used for cell embeddings: 0 embeddings, -1 last layer, -2 penultimate",
        )

    # -- building ----------------------------------------------------------------------------

    def _overrides(self) -> dict[str, Any]:
        overrides = {
            "num_hidden_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_positions,
        }
        if self.dropout is not None:
            overrides["hidden_dropout_prob"] = overrides["attention_probs_dropout_prob"] = self.dropout
        return overrides

    def _checkpoint_path(self) -> Path:
        path = Path(self.checkpoint).expanduser()
        if not (path / "config.json").is_file():
            raise DataError(
                f"geneformer: checkpoint folder {path} has no config.json. Download a model folder "
                f"(e.g. gf-6L-30M-i2048) from huggingface.co/ctheodoris/Geneformer and set "
                f"model.params.checkpoint to it, or leave checkpoint empty to train from scratch."
            )
        return path

    def _from_checkpoint(self, cls: Any, **kwargs: Any) -> Any:
        extra = {}
        if self.dropout is not None:
            extra = {"hidden_dropout_prob": self.dropout, "attention_probs_dropout_prob": self.dropout}
        return cls.from_pretrained(
            str(self._checkpoint_path()), local_files_only=True, attn_implementation="sdpa", **extra, **kwargs
        )

    def _hf_model(self, n_classes: int, vocab_size: int) -> Any:
        from transformers import BertForMaskedLM, BertForSequenceClassification

        cls = BertForSequenceClassification if n_classes else BertForMaskedLM
        kwargs = {"num_labels": n_classes} if n_classes else {}
        if self.checkpoint is not None:
            return self._from_checkpoint(cls, **kwargs)
        from grnx_plugins.models._geneformer_net import bert_config

        config = bert_config(self.architecture, self._overrides())
        # A model trained from scratch needs exactly the tokens' vocabulary.
        config.vocab_size = vocab_size
        for key, value in kwargs.items():
            setattr(config, key, value)
        config._attn_implementation = "sdpa"
        return cls(config)

    def _build_network(self, info: dict[str, Any], n_classes: int, tokens: TokenizedCells) -> Any:
        from grnx_plugins.models._geneformer_net import GeneformerNet

        hf_model = self._hf_model(n_classes, info["vocab_size"])
        if info["vocab_size"] > hf_model.config.vocab_size:
            raise DataError(
                f"geneformer: the tokens use ids up to {info['vocab_size'] - 1} but the checkpoint's "
                f"vocabulary has {hf_model.config.vocab_size} tokens. Tokenize with the token "
                f"dictionary of that checkpoint (V1: gc30M, V2: gc95M/gc104M)."
            )
        return GeneformerNet(hf_model, self.embedding_layer)

    def freeze(self, n_layers: int) -> None:
        """Stop gradients in the first ``n_layers`` encoder layers."""
        if n_layers > len(self.network_.bert.encoder.layer):
            raise GrnxError(
                f"geneformer: freeze_layers={n_layers} but the model has "
                f"{len(self.network_.bert.encoder.layer)} layers."
            )
        for layer in self.network_.bert.encoder.layer[:n_layers]:
            for parameter in layer.parameters():
                parameter.requires_grad_(False)

    def _mask_id(self, tokens: TokenizedCells) -> int:
        if "mask_id" in tokens.metadata:
            return int(tokens.metadata["mask_id"])
        if "<mask>" in tokens.vocabulary:
            return tokens.vocabulary.index("<mask>")
        return 1  # Geneformer's token dictionaries put <mask> at 1

    def _before_fit(
        self, context: RunContext, tokens: TokenizedCells, candidates: np.ndarray, config: Any, device: Any
    ) -> None:
        from grnx_plugins.models import _training as training
        from grnx_plugins.models._token_tasks import MaskedLMTask

        frozen = self.freeze_layers or config.freeze_layers
        if self.pretrain_epochs == 0:
            if not self.classes_:
                raise DataError(
                    "geneformer: no label column (data.label_key) and pretrain_epochs is 0, so there "
                    "is nothing to train. Set a label column or pretrain_epochs > 0."
                )
            self.freeze(frozen)
            return
        network = self.network_
        if self.classes_:  # pretrain a masked-LM model, then hand its encoder to the classifier
            from transformers import BertForMaskedLM

            if self.checkpoint is not None:
                mlm = self._from_checkpoint(BertForMaskedLM).to(device)
            else:
                mlm = BertForMaskedLM(network.hf.config).to(device)
                mlm.bert.load_state_dict(network.bert.state_dict(), strict=False)
        else:
            mlm = network.hf
        rng = context.rng("model.geneformer.pretrain")
        train_idx, val_idx = training.validation_split(
            None, candidates, config.validation_fraction, rng, self.donors(context, tokens)
        )
        task = MaskedLMTask(self, tokens, self._mask_id(tokens), self.mask_probability, device, context.seed)
        pretrain_config = config.model_copy(update={"epochs": self.pretrain_epochs})
        self.history_ += training.train(
            mlm,
            task,
            train_idx=train_idx,
            val_idx=val_idx,
            config=pretrain_config,
            context=context,
            rng=rng,
            device=device,
            prefix="pretrain",
        )
        if mlm is not network.hf:
            network.bert.load_state_dict(mlm.bert.state_dict(), strict=False)
        self.freeze(frozen)

    # -- persistence -------------------------------------------------------------------------

    def _save_network(self, folder: Path) -> dict[str, Any]:
        self.network_.hf.save_pretrained(str(folder / HF_FOLDER), safe_serialization=True)
        return {"hf_folder": HF_FOLDER, "head": "classification" if self.classes_ else "masked_lm"}

    def _load_network(self, folder: Path, meta: dict[str, Any]) -> Any:
        from transformers import BertForMaskedLM, BertForSequenceClassification

        from grnx_plugins.models._geneformer_net import GeneformerNet

        cls = BertForSequenceClassification if meta["classes"] else BertForMaskedLM
        hf_model = cls.from_pretrained(
            str(folder / meta["network"]["hf_folder"]), local_files_only=True, attn_implementation="sdpa"
        )
        return GeneformerNet(hf_model, self.embedding_layer)
