"""Shared behaviour of the token-sequence models (CelluFormer, Geneformer, scGPT).

Training, prediction, embeddings, attention maps, saving and loading are written once here; each
model supplies its network (a torch module with ``forward``/``embed``/``attention``) and how to
build, save and load it. This module does not import torch at import time; the torch side lives
in :mod:`grnx_plugins.models._token_tasks` and the ``_*_net`` modules.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path
from grnx_core.components import Model
from grnx_core.data_types import CellAttention
from grnx_core.errors import DataError, GrnxError
from grnx_core.threads import torch_threads

if TYPE_CHECKING:
    from grnx_core.context import RunContext
    from grnx_core.data_types import TokenizedCells

MODEL_FILE = "grnx_model.json"


def special_token_ids(tokens: TokenizedCells) -> list[int]:
    """Ids of special tokens: ``metadata["special_ids"]`` or vocabulary entries like ``<cls>``."""
    if "special_ids" in tokens.metadata:
        return sorted(int(i) for i in tokens.metadata["special_ids"])
    special = [
        i
        for i, name in enumerate(tokens.vocabulary)
        if isinstance(name, str) and name.startswith("<") and name.endswith(">")
    ]
    pad_id = int(tokens.metadata.get("pad_id", 0))
    return sorted(set(special) | {pad_id})


def token_info(tokens: TokenizedCells) -> dict[str, Any]:
    """What a model must remember about the tokens it was trained on."""
    vocab_size = max(
        int(tokens.metadata.get("vocab_size", 0)),
        len(tokens.vocabulary),
        int(tokens.input_ids.max()) + 1 if len(tokens.input_ids) else 1,
    )
    return {
        "pad_id": int(tokens.metadata.get("pad_id", 0)),
        "pad_value": float(tokens.metadata.get("pad_value", 0.0)),
        "special_ids": special_token_ids(tokens),
        "vocab_size": vocab_size,
        "has_values": tokens.values is not None,
    }


def json_value(value: Any) -> Any:
    """numpy scalars to Python values, so labels survive a JSON round trip."""
    return value.item() if isinstance(value, np.generic) else value


class TokenModel(Model):
    """Base of the models that read :class:`TokenizedCells`.

    Fitted state: ``network_`` (torch module), ``classes_`` (label values; index = class id),
    ``token_info_`` (pad id, pad value, special ids, vocabulary size), ``vocabulary_``,
    ``label_key_``, ``history_`` (per-epoch metrics).
    """

    input_kind = "tokens"
    #: whether ``fit`` can run without labels (masked-LM pretraining only).
    label_optional = False

    # -- hooks for subclasses ----------------------------------------------------------------

    def _build_network(self, info: dict[str, Any], n_classes: int, tokens: TokenizedCells) -> Any:
        raise NotImplementedError

    def _save_network(self, folder: Path) -> dict[str, Any]:
        raise NotImplementedError

    def _load_network(self, folder: Path, meta: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _before_fit(
        self, context: RunContext, tokens: TokenizedCells, candidates: np.ndarray, config: Any, device: Any
    ) -> None:
        """Runs after the network is built and before classification training (e.g. pretraining)."""

    def _check_vocabulary(self, tokens: TokenizedCells) -> None:
        """Raise when ``tokens`` were made with a vocabulary the network does not know."""
        stored = getattr(self, "vocabulary_", None)
        if stored and tokens.vocabulary and list(tokens.vocabulary) != list(stored):
            mismatched = next(
                (i for i, (a, b) in enumerate(zip(stored, tokens.vocabulary)) if a != b),
                min(len(stored), len(tokens.vocabulary)),
            )
            raise DataError(
                f"{self.name}: the tokens use a different vocabulary from the one the model was "
                f"trained with ({len(tokens.vocabulary)} vs {len(stored)} entries; first difference "
                f"at token id {mismatched}). Tokenize with the same tokenizer settings as in training."
            )
        vocab_size = self.token_info_["vocab_size"]
        if len(tokens.input_ids) and int(tokens.input_ids.max()) >= vocab_size:
            raise DataError(
                f"{self.name}: token id {int(tokens.input_ids.max())} is outside the model's "
                f"vocabulary of {vocab_size} tokens. Use the tokenizer the model was trained with."
            )

    # -- data helpers ------------------------------------------------------------------------

    @staticmethod
    def _require_tokens(context: RunContext, who: str) -> TokenizedCells:
        if context.tokens is None:
            raise DataError(
                f"{who} reads tokenized cells, but the recipe has no tokenizer. Add a 'tokenizer' section."
            )
        if len(context.tokens.lengths) and int(context.tokens.lengths.min()) == 0:
            empty = int(np.sum(context.tokens.lengths == 0))
            raise DataError(
                f"{who}: {empty} cells have no tokens (no expressed genes). Filter them out first "
                f"(e.g. the qc_filter preprocessor with min_genes: 1)."
            )
        return context.tokens

    @staticmethod
    def obs_column(context: RunContext, tokens: TokenizedCells, key: str) -> pd.Series | None:
        """A per-cell column from the tokens' obs, else from the data (``RunContext.cell_column``)."""
        return context.cell_column(tokens, key)

    def training_candidates(self, context: RunContext, tokens: TokenizedCells) -> np.ndarray:
        """Cells allowed in training: ``split == "train"`` when a split exists, else all."""
        split = self.obs_column(context, tokens, context.roles.split_key)
        if split is None:
            return np.arange(tokens.n_cells)
        chosen = np.flatnonzero(split.astype(str).to_numpy() == "train")
        if len(chosen) == 0:
            raise DataError(
                f"{self.name}: obs column {context.roles.split_key!r} exists but no cell is 'train'."
            )
        return chosen

    def encode_labels(self, context: RunContext, tokens: TokenizedCells) -> np.ndarray | None:
        """Class ids per cell (-1 where the label is missing); sets ``classes_`` and ``label_key_``."""
        key = context.roles.label_key
        if key is None:
            if self.label_optional:
                self.classes_, self.label_key_ = [], None
                return None
            raise DataError(
                f"{self.name} is a classifier and needs a label column. Set data.label_key in the recipe."
            )
        column = self.obs_column(context, tokens, key)
        if column is None:
            raise DataError(
                f"{self.name}: label column {key!r} is in neither the tokens' obs "
                f"({', '.join(map(str, tokens.obs.columns))}) nor the data. Check data.label_key."
            )
        values = column.to_numpy(dtype=object)
        present = ~pd.isna(column.to_numpy())
        classes = sorted({json_value(v) for v in values[present]}, key=str)
        if len(classes) < 2:
            raise DataError(
                f"{self.name}: label column {key!r} has {len(classes)} distinct value(s); a "
                f"classifier needs at least 2."
            )
        lookup = {value: index for index, value in enumerate(classes)}
        encoded = np.full(len(values), -1, dtype=np.int64)
        encoded[present] = [lookup[json_value(v)] for v in values[present]]
        self.classes_, self.label_key_ = classes, key
        return encoded

    # -- fitting -----------------------------------------------------------------------------

    def fit(self, context: RunContext) -> TokenModel:

        with torch_threads(context):
            return self._fit(context)

    def donors(self, context: RunContext, tokens: TokenizedCells) -> np.ndarray | None:
        """Donor per cell (``data.donor_key``), so validation holds out whole donors; None without."""
        key = context.roles.donor_key
        if key is None:
            return None
        column = self.obs_column(context, tokens, key)
        if column is None:
            raise DataError(
                f"{self.name}: donor column {key!r} (data.donor_key) is in neither the tokens' obs "
                f"nor the data. Check data.donor_key, or unset it."
            )
        return column.astype(str).to_numpy()

    def _fit(self, context: RunContext) -> TokenModel:
        from grnx_plugins.models import _token_tasks as tasks
        from grnx_plugins.models import _training as training

        tokens = self._require_tokens(context, self.name)
        config = training.train_config(context)
        device = training.resolve_device(config.device)
        labels = self.encode_labels(context, tokens)
        candidates = self.training_candidates(context, tokens)
        self.token_info_ = token_info(tokens)
        self.vocabulary_ = list(tokens.vocabulary)
        self.history_ = []
        with training.deterministic(context.seed, device):
            self.network_ = self._build_network(self.token_info_, len(self.classes_), tokens).to(device)
            self._before_fit(context, tokens, candidates, config, device)
            if labels is None:
                return self
            candidates = candidates[labels[candidates] >= 0]
            rng = context.rng(f"model.{self.name}")
            train_idx, val_idx = training.validation_split(
                labels, candidates, config.validation_fraction, rng, self.donors(context, tokens)
            )
            weights = training.class_weight_vector(
                labels[train_idx], len(self.classes_), config.class_weights
            )
            task = tasks.ClassificationTask(self, tokens, labels, weights, device)
            self.history_ += training.train(
                self.network_,
                task,
                train_idx=train_idx,
                val_idx=val_idx,
                config=config,
                context=context,
                rng=rng,
                device=device,
            )
        return self

    # -- inference ---------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if getattr(self, "network_", None) is None:
            raise GrnxError(
                f"{self.name} is not fitted: call fit(context) or {type(self).__name__}.load(path)."
            )

    def _cells(self, tokens: TokenizedCells, cells: np.ndarray | None) -> np.ndarray:
        return np.arange(tokens.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)

    def predict_proba(self, tokens: TokenizedCells, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (n_cells, n_classes); columns follow ``classes_``."""
        from grnx_plugins.models import _token_tasks as tasks

        self._require_fitted()
        self._check_vocabulary(tokens)
        if not self.classes_:
            raise GrnxError(
                f"{self.name} was pretrained without labels; it has no classifier to predict with."
            )
        return tasks.predict_proba(self, tokens, batch_size)

    def predict(self, inputs: TokenizedCells, batch_size: int = 64) -> np.ndarray:
        """Predicted label per cell (values of the label column)."""
        probabilities = self.predict_proba(inputs, batch_size)
        return np.asarray(self.classes_, dtype=object)[probabilities.argmax(axis=1)]

    def embed(
        self,
        inputs: TokenizedCells,
        layer: int | None = None,
        batch_size: int = 64,
        cells: np.ndarray | None = None,
    ) -> np.ndarray:
        """Cell embeddings (n_cells, d), float32; ``layer`` as each model documents."""
        from grnx_plugins.models import _token_tasks as tasks

        self._require_fitted()
        self._check_vocabulary(inputs)
        return tasks.embed(self, inputs, self._cells(inputs, cells), layer, batch_size)

    def attention(
        self,
        tokens: TokenizedCells,
        *,
        cells: np.ndarray | None = None,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        include_special: bool = False,
    ) -> Iterator[CellAttention]:
        """Per-cell attention maps over the cell's real tokens, one :class:`CellAttention` each.

        Maps are averaged over ``layers`` and ``heads`` (all when None; negative indices count
        from the end) and computed layer by layer from each layer's actual input; each layer's
        probabilities are folded into one (batch, L, L) sum block by block, so no (batch, heads,
        L, L) array is ever held. Padding never receives attention. ``max_length`` keeps each cell's first tokens only (its most expressed genes
        for expression-ordered and rank-value tokens). Special tokens (``<cls>``, ``<eos>``) take
        part in attention but are dropped from the map unless ``include_special``; without them a
        row sums to 1 minus what the token paid to the special tokens. Cells come in batches of
        similar length, not in input order: use ``CellAttention.cell``.
        """
        from grnx_plugins.models import _token_tasks as tasks

        self._require_fitted()
        self._check_vocabulary(tokens)
        yield from tasks.attention(
            self, tokens, self._cells(tokens, cells), layers, heads, batch_size, max_length, include_special
        )

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the fitted model to the folder ``path`` (weights without pickles, JSON metadata)."""
        self._require_fitted()
        path = Path(path)
        with atomic_path(path, directory=True) as folder:
            extra = self._save_network(folder)
            meta = {
                "component": self.name,
                "version": self.version(),
                "params": self.get_params(),
                "classes": self.classes_,
                "label_key": self.label_key_,
                "token_info": self.token_info_,
                "vocabulary": self.vocabulary_,
                "history": self.history_,
                "network": extra,
            }
            (folder / MODEL_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

    def use_device(self, device: str) -> None:
        from grnx_plugins.models import _training

        self.network_.to(_training.resolve_device(device))

    @classmethod
    def load(cls, path: Path) -> TokenModel:
        path = Path(path)
        meta_path = path / MODEL_FILE
        if not meta_path.is_file():
            raise GrnxError(f"{path} is not a saved grnx {cls.name} model: {MODEL_FILE} is missing.")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("component") != cls.name:
            raise GrnxError(
                f"{path} holds a {meta.get('component')!r} model, not {cls.name!r}; load it with that model."
            )
        model = cls(**meta["params"])
        model.classes_ = list(meta["classes"])
        model.label_key_ = meta["label_key"]
        model.token_info_ = meta["token_info"]
        model.vocabulary_ = meta["vocabulary"]
        model.history_ = meta["history"]
        model.network_ = model._load_network(path, meta)
        model.network_.eval()
        return model
