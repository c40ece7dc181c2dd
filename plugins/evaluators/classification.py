"""Classification metrics of the run's model on held-out cells: accuracy, F1, confusion matrix."""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from grnx_core import ComponentParams, DataError, EvaluationResult, Evaluator, RunContext

#: Characters replaced by ``_`` in a class label to make its metric name: those MLflow refuses (it
#: allows letters, digits, ``_ - . /``, space, and ``:`` except on Windows) and ``/``, which would
#: nest the label under ``f1``. ``CD4+/CD45RA+ Naive T`` -> ``f1/CD4__CD45RA_ Naive T``.
_REFUSED = re.compile(r"[^\w\-. ]")


def metric_labels(labels: list[str]) -> dict[str, str]:
    """label -> its form in metric names (see ``_REFUSED``), unique across ``labels``.

    Labels that become the same name (``CD4+`` and ``CD4_``) get ``_2``, ``_3``, ... in label order;
    a label of dots only (a path MLflow refuses) has them replaced too. The ``per_class`` table maps
    each name back to its label.
    """
    names: dict[str, str] = {}
    taken: set[str] = set()
    for label in labels:
        name = _REFUSED.sub("_", label)
        if not name.strip("."):
            name = name.replace(".", "_") or "_"
        candidate, copy = name, 1
        while candidate in taken:
            copy += 1
            candidate = f"{name}_{copy}"
        names[label] = candidate
        taken.add(candidate)
    return names


class ClassificationEvaluator(Evaluator):
    """Accuracy, macro-/weighted-F1, balanced accuracy and per-class F1 of ``context.model.predict``.

    Cells: those whose split column (``context.roles.split_key``, "split") equals ``split_value``
    ("test"), or every cell when the data has no split. Token models (``input_kind == "tokens"``) are
    given ``context.tokens`` restricted to those cells; AnnData models (``input_kind == "adata"``) the
    AnnData restricted to them. Predictions may be labels, integer class indices (mapped through the
    sorted label categories), or an (n_cells, n_classes) score matrix (arg-max). The metrics of the
    Geneformer fine-tuning study (accuracy, macro-F1; Theodoris et al., Nature 2023) plus a confusion
    matrix figure and table. Per-class F1 is logged as ``f1/<class>``.
    """

    name = "classification"
    description = "Accuracy, macro-F1, per-class F1 and confusion matrix of the model on held-out cells."
    reference = "https://doi.org/10.1038/s41586-023-06139-9"
    needs: ClassVar[tuple[str, ...]] = ("model", "model_inputs", "cells")
    #: all cells: the evaluator picks the held-out (split == split_value) cells itself.
    default_cells: ClassVar[str | None] = "all"

    class Params(ComponentParams):
        label_key: str | None = Field(
            None, description="obs column of the true labels; data.label_key when None"
        )
        split_value: str = Field("test", description="value of the split column marking held-out cells")
        all_cells_without_split: bool = Field(
            True, description="score every cell when the data has no split column; False makes that an error"
        )
        plot: bool = Field(True, description="draw the confusion matrix")

    higher_is_better: ClassVar[dict[str, bool]] = {
        "accuracy": True,
        "balanced_accuracy": True,
        "macro_f1": True,
        "weighted_f1": True,
        "f1": True,
    }
    informational: ClassVar[frozenset[str]] = frozenset({"n_cells", "n_classes"})

    def evaluate(self, context: RunContext) -> EvaluationResult:
        from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

        who = f"evaluator {self.name!r}"
        model = context.model
        if model is None:
            raise DataError(
                f"{who} scores a model's predictions, but the recipe trained none. Add a 'model' section."
            )
        label_key = self.label_key or context.roles.label_key
        if label_key is None:
            raise DataError(
                f"{who} needs the true labels: set data.label_key in the recipe or params.label_key."
            )
        inputs, truth, categories, scope = self._held_out(context, model, label_key, who)
        predicted = self._labels(np.asarray(model.predict(inputs)), truth, categories, who)
        if len(predicted) != len(truth):
            raise DataError(f"{who}: the model returned {len(predicted)} predictions for {len(truth)} cells.")
        truth, predicted = truth.astype(str), predicted.astype(str)
        classes = sorted(set(categories) | set(predicted))
        present = sorted(set(truth))
        metrics = {
            "accuracy": accuracy_score(truth, predicted),
            "balanced_accuracy": balanced_accuracy_score(truth, predicted),
            "macro_f1": f1_score(truth, predicted, labels=present, average="macro", zero_division=0),
            "weighted_f1": f1_score(truth, predicted, labels=present, average="weighted", zero_division=0),
            "n_cells": float(len(truth)),
            "n_classes": float(len(present)),
        }
        per_class = f1_score(truth, predicted, labels=present, average=None, zero_division=0)
        names = metric_labels(present)
        for label, value in zip(present, per_class):
            metrics[f"f1/{names[label]}"] = float(value)
        support = pd.Series(truth).value_counts()
        per_class_table = pd.DataFrame(
            {
                "metric": [f"f1/{names[label]}" for label in present],
                "label": present,
                "f1": per_class.astype(float),
                "n_cells": [int(support[label]) for label in present],
            }
        )
        matrix = confusion_matrix(truth, predicted, labels=classes)
        table = pd.DataFrame(matrix, index=pd.Index(classes, name="true"), columns=classes).reset_index()
        figures = {}
        if self.plot:
            from grnx_plugins.evaluators._plots import confusion_plot

            figures["confusion_matrix"] = confusion_plot(
                matrix,
                classes,
                f"{label_key} on {scope}: accuracy {metrics['accuracy']:.3f}, "
                f"macro-F1 {metrics['macro_f1']:.3f}",
            )
        return EvaluationResult(
            metrics={k: float(v) for k, v in metrics.items()},
            figures=figures,
            tables={"confusion_matrix": table, "per_class": per_class_table},
        )

    def _held_out(self, context: RunContext, model, label_key: str, who: str):
        """Model inputs, true labels and label categories of the held-out cells."""
        split_key = context.roles.split_key
        if getattr(model, "input_kind", "tokens") == "adata":
            adata = context.require_adata(who)
            obs = adata.obs
        else:
            if context.tokens is None:
                raise DataError(
                    f"{who}: the model reads tokens, but the run has none. Add a 'tokenizer' section."
                )
            obs = context.tokens.obs
            adata = None
        if label_key not in obs.columns:
            raise DataError(
                f"{who}: label column {label_key!r} is not among the cells' columns "
                f"({', '.join(map(str, obs.columns[:20]))}). Check data.label_key."
            )
        if split_key in obs.columns:
            mask = (obs[split_key].astype(str) == self.split_value).to_numpy()
            if not mask.any():
                raise DataError(
                    f"{who}: no cell has {split_key} == {self.split_value!r} (values: "
                    f"{sorted(map(str, obs[split_key].unique()))[:10]}). Set params.split_value."
                )
            scope = f"{int(mask.sum())} '{self.split_value}' cells"
        elif self.all_cells_without_split:
            mask = np.ones(len(obs), dtype=bool)
            scope = f"all {len(obs)} cells (no split)"
        else:
            raise DataError(f"{who}: the data has no {split_key!r} column; add a train/test split step.")
        labels = obs[label_key]
        known = labels.notna().to_numpy()
        mask &= known
        categories = sorted(map(str, labels[known].unique()))
        indices = np.flatnonzero(mask)
        inputs = adata[indices] if adata is not None else context.tokens.subset(indices)
        return inputs, labels.to_numpy()[indices], categories, scope

    @staticmethod
    def _labels(predicted: np.ndarray, truth: np.ndarray, categories: list[str], who: str) -> np.ndarray:
        """Labels from labels, integer class ids (index into the sorted categories) or scores."""
        if predicted.ndim == 2:
            predicted = predicted.argmax(axis=1)
        if predicted.ndim != 1:
            raise DataError(f"{who}: model.predict returned an array of shape {predicted.shape}.")
        truth_is_numeric = pd.api.types.is_numeric_dtype(pd.Series(truth).infer_objects())
        if np.issubdtype(predicted.dtype, np.integer) and not truth_is_numeric:
            if len(predicted) and (predicted.min() < 0 or predicted.max() >= len(categories)):
                raise DataError(
                    f"{who}: model.predict returned class ids up to {predicted.max()}, but the labels have "
                    f"{len(categories)} categories ({categories[:10]})."
                )
            return np.asarray(categories, dtype=object)[predicted]
        return predicted
