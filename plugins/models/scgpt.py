"""scGPT: a transformer over gene tokens plus binned expression values, fine-tuned to classify cells."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from grnx_core.components import ComponentParams
from grnx_core.errors import DataError, GrnxError
from grnx_plugins.models._base import TokenModel
from grnx_plugins.models._gene_embeddings import GeneEmbeddings

if TYPE_CHECKING:
    from grnx_core.data_types import TokenizedCells

ARGS_FILE, WEIGHTS_FILE, VOCAB_FILE = "args.json", "best_model.pt", "vocab.json"


class ScGPT(GeneEmbeddings, TokenModel):
    """scGPT (Cui et al., Nature Methods 2024) for cell classification.

    Input: ``binned`` tokens (``<cls>`` first, per-cell quantile bins as values). Gene-token
    embedding + value encoder, post-norm transformer encoder (ReLU), the ``<cls>`` state as cell
    embedding and scGPT's ``ClsDecoder`` head. With ``checkpoint`` a scGPT model folder
    (``args.json``, ``best_model.pt``, ``vocab.json``, e.g. the whole-human model) is loaded: the
    architecture comes from ``args.json`` (``embsize``, ``nlayers``, ``nheads``, ``d_hid``,
    ``dropout``, ``input_emb_style``, ``n_bins``, ``pre_norm``) and the weights with
    ``torch.load(weights_only=True)``; its task heads other than the classifier are ignored, the
    classifier is new. The tokens must use the checkpoint's ``vocab.json`` ids. Without a
    checkpoint the model is trained from scratch with the fields below (defaults: the
    whole-human model's 12 layers, 8 heads, d 512, dropout 0.2).

    Not supported: batch labels / domain-specific batch norm, the generative (flash) training
    path, the ``w-pool`` cell embedding. ``avg-pool`` excludes padding (scGPT averages it in).
    ``embed(tokens, layer=None)``: cell embedding from the output of block ``layer`` (default the
    last; negative counts from the end).
    ``input_gene_embeddings``: ``encoder(ids)``, the gene-token embedding after its LayerNorm, as
    scGPT's GRN tutorial reads gene embeddings; ``contextual_gene_embeddings``: each gene token's
    output of block ``layer`` in its cell (0 = gene + value embedding).
    """

    name = "scgpt"
    description = "scGPT transformer (gene + binned value tokens); loads scGPT checkpoint folders or trains from scratch."
    reference = "https://doi.org/10.1038/s41592-024-02201-0"

    class Params(ComponentParams):
        checkpoint: str | None = Field(
            None,
            description="scGPT model folder with args.json, best_model.pt, vocab.json; None = from scratch",
        )
        d_model: int | None = Field(None, ge=1, description="embedding size (from scratch; default 512)")
        n_layers: int | None = Field(None, ge=1, description="transformer layers (from scratch; default 12)")
        n_heads: int | None = Field(None, ge=1, description="attention heads (from scratch; default 8)")
        d_ff: int | None = Field(None, ge=1, description="feed-forward width (from scratch; default 512)")
        dropout: float | None = Field(None, ge=0.0, lt=1.0, description="dropout; None = checkpoint's or 0.2")
        input_emb_style: Literal["continuous", "category", "scaling"] | None = Field(
            None, description="how values are embedded (from scratch; default continuous)"
        )
        n_bins: int = Field(51, ge=2, description="value bins (category style, from scratch)")
        pre_norm: bool = Field(False, description="pre-norm blocks (from scratch)")
        n_layers_cls: int = Field(3, ge=1, description="layers of the classification head")
        cell_emb_style: Literal["cls", "avg-pool"] = Field(
            "cls", description="cell embedding: <cls> state or mean"
        )
        freeze_layers: int = Field(
            0,
            ge=0,
            description="freeze the first N transformer layers during fine-tuning; 0 = train.freeze_layers",
        )

    # -- checkpoint folders ------------------------------------------------------------------

    def _checkpoint_folder(self) -> Path:
        folder = Path(self.checkpoint).expanduser()
        missing = [name for name in (ARGS_FILE, WEIGHTS_FILE, VOCAB_FILE) if not (folder / name).is_file()]
        if missing:
            raise DataError(
                f"scgpt: checkpoint folder {folder} lacks {', '.join(missing)}. A scGPT model folder "
                f"(e.g. scGPT_human) holds args.json, best_model.pt and vocab.json."
            )
        return folder

    @staticmethod
    def read_state(path: Path) -> dict[str, Any]:
        import torch

        from grnx_plugins.models._scgpt_net import convert_state_dict

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise DataError(
                f"scgpt: {path} could not be read as a weights-only PyTorch state dict "
                f"({type(error).__name__}: {error})."
            ) from error
        for wrapper in ("model_state_dict", "state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
        return convert_state_dict(state)

    def _args(self, stored: dict[str, Any] | None) -> dict[str, Any]:
        from grnx_plugins.models._scgpt_net import WHOLE_HUMAN

        args = dict(WHOLE_HUMAN)
        if stored is not None:
            args.update(stored)
        else:
            chosen = {
                "embsize": self.d_model,
                "nlayers": self.n_layers,
                "nheads": self.n_heads,
                "d_hid": self.d_ff,
                "input_emb_style": self.input_emb_style,
            }
            args.update({key: value for key, value in chosen.items() if value is not None})
            args.update({"n_bins": self.n_bins, "pre_norm": self.pre_norm})
        if self.dropout is not None:
            args["dropout"] = self.dropout
        args["n_layers_cls"] = self.n_layers_cls
        args["cell_emb_style"] = self.cell_emb_style
        if int(args["embsize"]) % int(args["nheads"]):
            raise GrnxError(f"scgpt: embsize {args['embsize']} is not divisible by nheads {args['nheads']}.")
        return args

    def _check_vocab(self, vocab: dict[str, int], tokens: TokenizedCells | None) -> None:
        if tokens is None or not tokens.vocabulary:
            return
        wrong = [(i, name) for i, name in enumerate(tokens.vocabulary) if name in vocab and vocab[name] != i]
        unknown = [name for name in tokens.vocabulary if name not in vocab]
        if wrong or len(unknown) == len(tokens.vocabulary):
            example = (
                f" (e.g. {wrong[0][1]!r} is token {wrong[0][0]} in the tokens but {vocab[wrong[0][1]]} in vocab.json)"
                if wrong
                else ""
            )
            raise DataError(
                f"scgpt: the tokens were not made with the checkpoint's vocab.json{example}. Give the "
                f"binned tokenizer the checkpoint's vocab.json so token ids match the embeddings."
            )

    # -- building ----------------------------------------------------------------------------

    def _build_network(self, info: dict[str, Any], n_classes: int, tokens: TokenizedCells) -> Any:
        from grnx_plugins.models._scgpt_net import BACKBONE_PREFIXES, ScGPTNet

        if self.checkpoint is None:
            return ScGPTNet(self._args(None), info["vocab_size"], n_classes, info["pad_id"])
        folder = self._checkpoint_folder()
        stored = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
        vocab = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        self._check_vocab(vocab, tokens)
        state = self.read_state(folder / WEIGHTS_FILE)
        if "encoder.embedding.weight" not in state:
            raise DataError(
                f"scgpt: {folder / WEIGHTS_FILE} has no encoder.embedding.weight; it is not a scGPT model."
            )
        n_tokens = int(state["encoder.embedding.weight"].shape[0])
        if info["vocab_size"] > n_tokens:
            raise DataError(
                f"scgpt: the tokens use ids up to {info['vocab_size'] - 1}, the checkpoint knows {n_tokens} tokens."
            )
        pad_id = vocab.get(stored.get("pad_token", "<pad>"), info["pad_id"])
        network = ScGPTNet(self._args(stored), n_tokens, n_classes, pad_id)
        expected = network.state_dict()
        backbone = [key for key in expected if key.startswith(BACKBONE_PREFIXES)]
        missing = [key for key in backbone if key not in state]
        if missing:
            raise DataError(
                f"scgpt: {folder / WEIGHTS_FILE} lacks {len(missing)} backbone weights (first: "
                f"{missing[0]}); args.json may not describe this checkpoint."
            )
        wrong_shape = [key for key in backbone if state[key].shape != expected[key].shape]
        if wrong_shape:
            key = wrong_shape[0]
            raise DataError(
                f"scgpt: weight {key} has shape {tuple(state[key].shape)} in the checkpoint but "
                f"{tuple(expected[key].shape)} in the model built from args.json."
            )
        heads = {
            key: value
            for key, value in state.items()
            if key in expected
            and not key.startswith(BACKBONE_PREFIXES)
            and value.shape == expected[key].shape
        }
        network.load_state_dict({**{key: state[key] for key in backbone}, **heads}, strict=False)
        self.load_report_ = {
            "loaded": len(backbone) + len(heads),
            "ignored": sorted(
                key for key in state if key not in expected or key not in heads and key not in backbone
            ),
        }
        self.checkpoint_vocab_ = vocab
        return network

    def _before_fit(
        self, context: Any, tokens: TokenizedCells, candidates: Any, config: Any, device: Any
    ) -> None:
        layers = self.network_.transformer_encoder.layers
        frozen = self.freeze_layers or config.freeze_layers
        if frozen > len(layers):
            raise GrnxError(f"scgpt: freeze_layers={frozen} but the model has {len(layers)} layers.")
        for layer in layers[:frozen]:
            for parameter in layer.parameters():
                parameter.requires_grad_(False)

    # -- persistence (scGPT's own folder format, plus grnx_model.json) ----------------------

    def _save_network(self, folder: Path) -> dict[str, Any]:
        import torch

        network = self.network_
        (folder / ARGS_FILE).write_text(json.dumps(network.args, indent=1), encoding="utf-8")
        state = {key: value.detach().cpu() for key, value in network.state_dict().items()}
        torch.save(state, folder / WEIGHTS_FILE)
        vocab = getattr(self, "checkpoint_vocab_", None) or {
            name: index for index, name in enumerate(self.vocabulary_)
        }
        (folder / VOCAB_FILE).write_text(json.dumps(vocab), encoding="utf-8")
        return {"args": ARGS_FILE, "weights": WEIGHTS_FILE, "vocab": VOCAB_FILE}

    def _load_network(self, folder: Path, meta: dict[str, Any]) -> Any:
        from grnx_plugins.models._scgpt_net import ScGPTNet

        args = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
        state = self.read_state(folder / WEIGHTS_FILE)
        self.checkpoint_vocab_ = json.loads((folder / VOCAB_FILE).read_text(encoding="utf-8"))
        n_tokens = int(state["encoder.embedding.weight"].shape[0])
        pad_id = self.checkpoint_vocab_.get(args.get("pad_token", "<pad>"), meta["token_info"]["pad_id"])
        network = ScGPTNet(args, n_tokens, len(meta["classes"]), pad_id)
        network.load_state_dict(state)
        return network
