"""A multilayer perceptron over a cell's expression vector: the model NID explains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core.atomic import atomic_path
from grnx_core.components import ComponentParams, Model
from grnx_core.errors import DataError, GrnxError
from grnx_core.threads import torch_threads
from grnx_plugins.models._base import MODEL_FILE, json_value

if TYPE_CHECKING:
    import anndata

    from grnx_core.context import RunContext

WEIGHTS_FILE = "model.safetensors"


class MLP(Model):
    """Dense classifier over the gene universe (Tsang, Cheng, Liu, ICLR 2018, as used by WDS).

    Input: the sampled cells' expression (``adata.X`` or ``layer``) over ``genes`` (all of
    ``var_names`` when None), optionally standardised per gene with training statistics. Hidden
    layers ``hidden_sizes`` with Softplus and dropout; the first layer has no bias, so its weight
    matrix ``W1`` (h1 x p) alone links genes to hidden units. ``l1`` adds NID's L1 penalty on all
    weight matrices (sparse weights sharpen the interaction ranking). Trains on
    ``obs["split"] == "train"`` cells when a split exists, with the recipe's train settings.

    For NID: ``weight_matrices()`` returns ``[W1, W2, ..., W_out]`` (each out x in, numpy float32)
    and ``genes_`` names W1's columns. ``embed(adata)`` gives the last hidden layer's activations.
    """

    name = "mlp"
    description = "MLP on dense expression (Softplus, first layer without bias) for NID interactions."
    reference = "https://openreview.net/forum?id=ByOfBggRZ"
    input_kind = "adata"

    class Params(ComponentParams):
        hidden_sizes: list[int] = Field([128, 64], min_length=1, description="width of each hidden layer")
        dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout after each hidden layer")
        l1: float = Field(0.0, ge=0.0, description="L1 penalty on all weight matrices (NID's regulariser)")
        layer: str | None = Field(None, description="expression layer to read; adata.X when None")
        genes: list[str] | None = Field(None, description="gene universe (var_names); all genes when None")
        standardize: bool = Field(False, description="z-score each gene with the training cells' mean and sd")

    # -- data --------------------------------------------------------------------------------

    def _matrix(self, adata: anndata.AnnData) -> Any:
        if self.layer is not None and self.layer not in adata.layers:
            raise DataError(
                f"mlp: layer {self.layer!r} is not in the data (layers: {', '.join(adata.layers.keys()) or 'none'})."
            )
        genes = getattr(self, "genes_", None) or (
            self.genes if self.genes is not None else list(adata.var_names)
        )
        index = pd.Index(adata.var_names).get_indexer(genes)
        if (index < 0).any():
            missing = [g for g, i in zip(genes, index) if i < 0]
            raise DataError(
                f"mlp: {len(missing)} genes of the model's gene universe are not in var_names "
                f"(e.g. {missing[:3]}). Use data with the same genes as in training."
            )
        matrix = adata.layers[self.layer] if self.layer is not None else adata.X
        if hasattr(matrix, "to_memory"):
            matrix = matrix.to_memory()
        if not (hasattr(matrix, "tocsr") or isinstance(matrix, np.ndarray)):
            matrix = np.asarray(matrix)
        matrix = matrix.tocsr() if hasattr(matrix, "tocsr") else matrix
        return matrix[:, index], list(genes)

    # -- fitting -----------------------------------------------------------------------------

    def fit(self, context: RunContext) -> MLP:

        with torch_threads(context):
            return self._fit(context)

    def _fit(self, context: RunContext) -> MLP:
        from grnx_plugins.models import _training as training
        from grnx_plugins.models._mlp_net import MLPNet, MLPTask, dense_rows

        adata, _ = context.sampled_adata()
        key = context.require_obs(context.roles.label_key, "label_key", "mlp")
        matrix, genes = self._matrix(adata)
        config = training.train_config(context)
        device = training.resolve_device(config.device)
        column = adata.obs[key]
        present = ~pd.isna(column.to_numpy())
        classes = sorted({json_value(v) for v in column.to_numpy(dtype=object)[present]}, key=str)
        if len(classes) < 2:
            raise DataError(
                f"mlp: label column {key!r} has {len(classes)} distinct value(s); need at least 2."
            )
        lookup = {value: i for i, value in enumerate(classes)}
        labels = np.array(
            [lookup[json_value(v)] if ok else -1 for v, ok in zip(column.to_numpy(dtype=object), present)]
        )
        candidates = np.flatnonzero(labels >= 0)
        split_key = context.roles.split_key
        if split_key in adata.obs.columns:
            candidates = candidates[adata.obs[split_key].astype(str).to_numpy()[candidates] == "train"]
            if len(candidates) == 0:
                raise DataError(f"mlp: no labelled cell has {split_key} == 'train'.")
        donors = None
        if context.roles.donor_key is not None:  # validation on whole held-out donors
            donor_key = context.require_obs(context.roles.donor_key, "donor_key", "mlp")
            donors = adata.obs[donor_key].astype(str).to_numpy()
        rng = context.rng("model.mlp")
        train_idx, val_idx = training.validation_split(
            labels, candidates, config.validation_fraction, rng, donors
        )
        scale = None
        if self.standardize:
            block = dense_rows(matrix, train_idx).astype(np.float64)
            sd = block.std(axis=0)
            scale = (block.mean(axis=0).astype(np.float32), np.where(sd > 0, sd, 1.0).astype(np.float32))
        self.genes_, self.classes_, self.label_key_, self.scale_ = genes, classes, key, scale
        weights = training.class_weight_vector(labels[train_idx], len(classes), config.class_weights)
        with training.deterministic(context.seed, device):
            self.network_ = MLPNet(len(genes), list(self.hidden_sizes), len(classes), self.dropout).to(device)
            task = MLPTask(matrix, labels, weights, self.l1, scale, device)
            self.history_ = training.train(
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
            raise GrnxError("mlp is not fitted: call fit(context) or MLP.load(path).")

    def _batches(self, adata: anndata.AnnData, batch_size: int, fn: Any) -> np.ndarray:
        import torch

        from grnx_plugins.models._mlp_net import MLPTask

        self._require_fitted()
        matrix, _ = self._matrix(adata)
        device = next(self.network_.parameters()).device
        task = MLPTask(matrix, np.zeros(0, np.int64), None, 0.0, self.scale_, device)
        self.network_.eval()
        outputs = []
        with torch.no_grad():
            for start in range(0, adata.n_obs, batch_size):
                rows = np.arange(start, min(start + batch_size, adata.n_obs))
                outputs.append(fn(task.inputs(rows)).float().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def predict_proba(self, inputs: anndata.AnnData, batch_size: int = 256) -> np.ndarray:
        """Class probabilities (n_cells, n_classes), columns in ``classes_`` order."""
        import torch

        return self._batches(inputs, batch_size, lambda x: torch.softmax(self.network_(x), -1))

    def predict(self, inputs: anndata.AnnData, batch_size: int = 256) -> np.ndarray:
        return np.asarray(self.classes_, dtype=object)[self.predict_proba(inputs, batch_size).argmax(1)]

    def embed(self, inputs: anndata.AnnData, batch_size: int = 256) -> np.ndarray:
        """Activations of the last hidden layer (n_cells, hidden_sizes[-1])."""
        return self._batches(inputs, batch_size, self.network_.features)

    def weight_matrices(self) -> list[np.ndarray]:
        """``[W1 (h1 x n_genes), W2 (h2 x h1), ..., W_out (n_classes x h_last)]`` as numpy arrays."""
        self._require_fitted()
        return self.network_.weight_matrices()

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        self._require_fitted()
        with atomic_path(Path(path), directory=True) as folder:
            state = {k: v.detach().cpu().contiguous() for k, v in self.network_.state_dict().items()}
            save_file(state, str(folder / WEIGHTS_FILE))
            meta = {
                "component": self.name,
                "version": self.version(),
                "params": self.get_params(),
                "genes": self.genes_,
                "classes": self.classes_,
                "label_key": self.label_key_,
                "scale": None if self.scale_ is None else [s.tolist() for s in self.scale_],
                "history": self.history_,
            }
            (folder / MODEL_FILE).write_text(json.dumps(meta), encoding="utf-8")

    def use_device(self, device: str) -> None:
        from grnx_plugins.models import _training

        self.network_.to(_training.resolve_device(device))

    @classmethod
    def load(cls, path: Path) -> MLP:
        from safetensors.torch import load_file

        from grnx_plugins.models._mlp_net import MLPNet

        path = Path(path)
        if not (path / MODEL_FILE).is_file():
            raise GrnxError(f"{path} is not a saved grnx mlp model: {MODEL_FILE} is missing.")
        meta = json.loads((path / MODEL_FILE).read_text(encoding="utf-8"))
        if meta.get("component") != cls.name:
            raise GrnxError(f"{path} holds a {meta.get('component')!r} model, not 'mlp'.")
        model = cls(**meta["params"])
        model.genes_, model.classes_, model.label_key_ = meta["genes"], meta["classes"], meta["label_key"]
        model.history_ = meta["history"]
        model.scale_ = (
            None if meta["scale"] is None else tuple(np.asarray(s, np.float32) for s in meta["scale"])
        )
        model.network_ = MLPNet(
            len(model.genes_), list(model.hidden_sizes), len(model.classes_), model.dropout
        )
        model.network_.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        model.network_.eval()
        return model
