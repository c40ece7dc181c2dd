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


#: metrics reported next to their majority-class and chance baselines
_BASELINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "auroc")


def baselines(truth: np.ndarray, train_labels: np.ndarray, present: list[str]) -> dict[str, float]:
    """What a classifier that learned nothing from the cells scores on ``truth``.

    ``majority``: always the most frequent training label (ties: the first in sorted order),
    scored exactly with scikit-learn. ``chance``: labels drawn at random with the training label
    frequencies q, in expectation: accuracy sum_c p_c q_c (p: the held-out frequencies), balanced
    accuracy sum_c q_c / K over the K held-out classes, per-class F1 ``2 p_c q_c / (p_c + q_c)``
    (precision q-independent p_c, recall q_c; the expectation of F1 for large n), averaged
    unweighted (macro) or by p (weighted). AUROC 0.5 for both: scores carry no information.
    Held-out accuracy below ``accuracy_majority`` means the model does worse than not looking.
    When no labelled cell is outside the held-out set, the held-out frequencies stand in for q.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    train_labels = np.asarray(train_labels).astype(str)
    if len(train_labels) == 0:  # every labelled cell is held out: the held-out frequencies stand in
        train_labels = np.asarray(truth).astype(str)
    counts = pd.Series(train_labels).value_counts()
    majority = sorted(counts[counts == counts.max()].index)[0]
    always = np.full(len(truth), majority, dtype=object)
    result = {
        "accuracy_majority": accuracy_score(truth, always),
        "balanced_accuracy_majority": balanced_accuracy_score(truth, always),
        "macro_f1_majority": f1_score(truth, always, labels=present, average="macro", zero_division=0),
        "weighted_f1_majority": f1_score(truth, always, labels=present, average="weighted", zero_division=0),
    }
    p = pd.Series(truth).value_counts(normalize=True).reindex(present, fill_value=0.0).to_numpy()
    q = (counts / counts.sum()).reindex(present, fill_value=0.0).to_numpy()
    f1 = np.divide(2 * p * q, p + q, out=np.zeros_like(p), where=(p + q) > 0)
    result.update(
        {
            "accuracy_chance": float(np.sum(p * q)),
            "balanced_accuracy_chance": float(q.sum() / len(present)),
            "macro_f1_chance": float(f1.mean()),
            "weighted_f1_chance": float(np.sum(p * f1)),
        }
    )
    return {key: float(value) for key, value in result.items()}


class ClassificationEvaluator(Evaluator):
    """Accuracy, macro-/weighted-F1, balanced accuracy, per-class F1 (and AUROC for two classes) of
    ``context.model``, each next to its majority-class and chance baselines (see ``baselines``).

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
        "auroc": True,
    }
    #: counts, and what a model that learned nothing scores (see ``baselines``)
    informational: ClassVar[frozenset[str]] = frozenset(
        {"n_cells", "n_classes", "n_train_cells"}
        | {f"{metric}_{baseline}" for metric in _BASELINE_METRICS for baseline in ("majority", "chance")}
    )

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
        inputs, truth, categories, scope, train_labels = self._held_out(context, model, label_key, who)
        raw = np.asarray(model.predict(inputs))
        predicted = self._labels(raw, truth, categories, who)
        if len(predicted) != len(truth):
            raise DataError(f"{who}: the model returned {len(predicted)} predictions for {len(truth)} cells.")
        truth, predicted = truth.astype(str), predicted.astype(str)
        classes = sorted(set(categories) | set(predicted))
        present = sorted(set(truth))
        if len(present) < 2:
            raise DataError(
                f"{who}: the {len(truth)} cells scored ({scope}) all have {label_key} == "
                f"{str(present[0]) if present else None!r}, one of the {len(categories)} labels "
                f"({', '.join(map(repr, categories[:10]))}): accuracy is then the share of one class "
                "and balanced accuracy, F1 and AUROC are meaningless. Hold out cells of every class: "
                "stratify the split (its label_key) or give each class more donors; a split step "
                "lists labels_missing_from_test in its summary."
            )
        metrics = {
            "accuracy": accuracy_score(truth, predicted),
            "balanced_accuracy": balanced_accuracy_score(truth, predicted),
            "macro_f1": f1_score(truth, predicted, labels=present, average="macro", zero_division=0),
            "weighted_f1": f1_score(truth, predicted, labels=present, average="weighted", zero_division=0),
            "n_cells": float(len(truth)),
            "n_classes": float(len(present)),
        }
        metrics["n_train_cells"] = float(len(train_labels))
        metrics.update(baselines(truth, train_labels, present))
        if len(present) == 2:
            auroc = self._auroc(model, inputs, truth, present)
            if auroc is not None:
                metrics.update({"auroc": auroc, "auroc_majority": 0.5, "auroc_chance": 0.5})
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
                f"{label_key} on {scope}: accuracy {metrics['accuracy']:.3f} (majority class "
                f"{metrics['accuracy_majority']:.3f}), macro-F1 {metrics['macro_f1']:.3f} "
                f"(chance {metrics['macro_f1_chance']:.3f})",
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
        # The baselines learn from the cells the model could learn from: the other split values.
        train = known & ~mask if split_key in obs.columns else known
        mask &= known
        categories = sorted(map(str, labels[known].unique()))
        indices = np.flatnonzero(mask)
        inputs = adata[indices] if adata is not None else context.tokens.subset(indices)
        return inputs, labels.to_numpy()[indices], categories, scope, labels.to_numpy()[train]

    @staticmethod
    def _auroc(model, inputs, truth: np.ndarray, present: list[str]) -> float | None:
        """AUROC of the model's probability of the second class (sorted), when it gives them."""
        from sklearn.metrics import roc_auc_score

        predict_proba = getattr(model, "predict_proba", None)
        classes = [str(c) for c in getattr(model, "classes_", [])]
        if predict_proba is None or present[1] not in classes:
            return None
        scores = np.asarray(predict_proba(inputs))[:, classes.index(present[1])]
        return float(roc_auc_score(np.asarray(truth) == present[1], scores))

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
