"""Classification metrics of a model's predictions on the held-out split, against scikit-learn."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from grnx_core import DataError, DataRoles, Model, RunContext, TokenizedCells
from grnx_plugins.evaluators.classification import ClassificationEvaluator


class NearestCentroid(Model):
    """A real (tiny) classifier on expression: nearest class mean, scikit-learn style."""

    name = "nearest_centroid_test"
    input_kind = "adata"

    def __init__(self, *, as_indices: bool = False) -> None:
        self.as_indices = as_indices

    def fit(self, context: RunContext) -> NearestCentroid:
        adata = context.adata
        train = (adata.obs["split"] == "train").to_numpy()
        labels = adata.obs["cell_type"].to_numpy()[train]
        self.classes_ = sorted(set(labels))
        self.centroids_ = np.stack([adata.X[train][labels == c].mean(axis=0) for c in self.classes_])
        return self

    def predict(self, inputs: anndata.AnnData) -> np.ndarray:
        distances = ((np.asarray(inputs.X)[:, None, :] - self.centroids_[None]) ** 2).sum(-1)
        index = distances.argmin(axis=1)
        return index if self.as_indices else np.asarray(self.classes_, dtype=object)[index]


class FirstTokenVote(Model):
    """A token model: the majority training label of each cell's first token."""

    name = "first_token_test"
    input_kind = "tokens"

    def fit(self, context: RunContext) -> FirstTokenVote:
        tokens = context.tokens
        first = tokens.input_ids[tokens.offsets[:-1]]
        frame = pd.DataFrame({"first": first, "label": tokens.obs["label"].to_numpy()})
        frame = frame[(tokens.obs["split"] == "train").to_numpy()]
        self.vote_ = frame.groupby("first")["label"].agg(lambda s: s.value_counts().index[0]).to_dict()
        return self

    def predict(self, inputs: TokenizedCells) -> np.ndarray:
        first = inputs.input_ids[inputs.offsets[:-1]]
        return np.array([self.vote_.get(int(t), "a") for t in first], dtype=object)


def expression_data(seed=0, n_cells=300, with_split=True):
    rng = np.random.default_rng(seed)
    cell_type = rng.choice(["B cell", "T cell", "monocyte"], size=n_cells, p=[0.3, 0.5, 0.2])
    means = {"B cell": [2, 0, 0, 1], "T cell": [0, 2, 0, 1], "monocyte": [0, 0, 2, 1]}
    x = np.stack([means[c] for c in cell_type]) + rng.normal(scale=1.2, size=(n_cells, 4))
    obs = pd.DataFrame({"cell_type": pd.Categorical(cell_type)}, index=[f"c{i}" for i in range(n_cells)])
    if with_split:
        obs["split"] = np.where(rng.random(n_cells) < 0.7, "train", "test")
    return anndata.AnnData(X=x.astype(np.float32), obs=obs)


@pytest.mark.parametrize("as_indices", [False, True])
def test_adata_model_on_the_test_split_matches_sklearn(as_indices):
    adata = expression_data()
    context = RunContext(seed=0, adata=adata, roles=DataRoles(label_key="cell_type"))
    context.model = NearestCentroid(as_indices=as_indices).fit(context)
    result = ClassificationEvaluator().evaluate(context)

    test = (adata.obs["split"] == "test").to_numpy()
    truth = adata.obs["cell_type"].astype(str).to_numpy()[test]
    predicted = NearestCentroid().fit(context).predict(adata[test])
    assert result.metrics["n_cells"] == test.sum()
    assert result.metrics["accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    assert result.metrics["macro_f1"] == pytest.approx(f1_score(truth, predicted, average="macro"))
    per_class = f1_score(truth, predicted, average=None, labels=["B cell", "T cell", "monocyte"])
    assert result.metrics["f1/B cell"] == pytest.approx(per_class[0])
    assert result.metrics["f1/monocyte"] == pytest.approx(per_class[2])
    assert 0.5 < result.metrics["accuracy"] < 1.0  # a real, imperfect classifier
    table = result.tables["confusion_matrix"].set_index("true")
    expected = confusion_matrix(truth, predicted, labels=["B cell", "T cell", "monocyte"])
    np.testing.assert_array_equal(table.to_numpy(), expected)
    assert "confusion_matrix" in result.figures
    assert all(ClassificationEvaluator.declares(k) for k in result.metrics)


def test_without_a_split_all_cells_are_scored():
    adata = expression_data(with_split=False)
    adata.obs["split"] = "train"
    context = RunContext(seed=0, adata=adata, roles=DataRoles(label_key="cell_type"))
    model = NearestCentroid().fit(context)
    del adata.obs["split"]
    context.model = model
    result = ClassificationEvaluator(plot=False).evaluate(context)
    assert result.metrics["n_cells"] == adata.n_obs
    with pytest.raises(DataError, match="no 'split' column"):
        ClassificationEvaluator(all_cells_without_split=False).evaluate(context)


def test_token_model_uses_the_tokens_test_cells():
    rng = np.random.default_rng(1)
    n_cells = 200
    labels = rng.choice(["a", "b"], size=n_cells)
    lengths = rng.integers(1, 5, size=n_cells)
    first = np.where(labels == "a", 5, 6)
    first = np.where(rng.random(n_cells) < 0.2, 11 - first, first)  # 20% noise
    ids = np.concatenate([[f, *rng.integers(7, 20, size=n - 1)] for f, n in zip(first, lengths)])
    obs = pd.DataFrame({"label": labels, "split": np.where(rng.random(n_cells) < 0.6, "train", "test")})
    tokens = TokenizedCells(input_ids=ids, offsets=np.r_[0, np.cumsum(lengths)], obs=obs)
    context = RunContext(seed=0, tokens=tokens, roles=DataRoles(label_key="label"))
    context.model = FirstTokenVote().fit(context)
    metrics = ClassificationEvaluator(plot=False).evaluate(context).metrics
    test = (obs["split"] == "test").to_numpy()
    predicted = np.where(first[test] == 5, "a", "b")
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels[test], predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels[test], predicted, average="macro"))


def test_clear_errors():
    adata = expression_data()
    context = RunContext(seed=0, adata=adata, roles=DataRoles(label_key="cell_type"))
    with pytest.raises(DataError, match="trained none"):
        ClassificationEvaluator().evaluate(context)
    context.model = NearestCentroid().fit(context)
    with pytest.raises(DataError, match="'disease' is not among"):
        ClassificationEvaluator(label_key="disease").evaluate(context)
    with pytest.raises(DataError, match="no cell has split == 'holdout'"):
        ClassificationEvaluator(split_value="holdout").evaluate(context)


class Echo(Model):
    """Predicts each cell's true label (from obs), so every per-class F1 is 1."""

    name = "echo_test"
    input_kind = "adata"

    def predict(self, inputs: anndata.AnnData) -> np.ndarray:
        return inputs.obs["cell_type"].astype(str).to_numpy()


def test_class_labels_stay_readable_and_distinct_in_metric_names():
    """MLflow refuses '+', and '/' would nest the label: both become '_', collisions get '_2'."""
    import re

    from grnx_plugins.evaluators.classification import metric_labels

    labels = ["CD4+/CD45RA+/CD25- Naive T", "B cell", "CD4+", "CD4_", "NK (CD56 bright)", "..", "γδ T"]
    names = metric_labels(labels)
    assert names["CD4+/CD45RA+/CD25- Naive T"] == "CD4__CD45RA__CD25- Naive T"
    assert names["B cell"] == "B cell" and names["γδ T"] == "γδ T"  # letters of any script are allowed
    assert (names["CD4+"], names["CD4_"]) == ("CD4_", "CD4__2")
    assert names["NK (CD56 bright)"] == "NK _CD56 bright_" and names[".."] == "__"
    assert len(set(names.values())) == len(labels)
    assert all(re.fullmatch(r"[\w\-. ]+", name) for name in names.values())  # MLflow's rule, minus ':'

    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(labels, 60)), "split": "test"},
        index=[f"c{i}" for i in range(60)],
    )
    adata = anndata.AnnData(X=np.zeros((60, 2), dtype=np.float32), obs=obs)
    context = RunContext(adata=adata, model=Echo(), roles=DataRoles(label_key="cell_type"))
    result = ClassificationEvaluator(plot=False).evaluate(context)
    table = result.tables["per_class"].set_index("label")
    assert set(table.index) == set(obs["cell_type"])
    for label, row in table.iterrows():
        assert row["metric"] == f"f1/{names[label]}" and result.metrics[row["metric"]] == row["f1"] == 1.0
        assert row["n_cells"] == int((obs["cell_type"] == label).sum())
    assert not any(name.count("/") > 1 for name in result.metrics)


def test_every_metric_comes_with_its_majority_class_and_chance_baselines():
    """The synthetic disease recipe's 0.67 held-out accuracy was below always answering 'control'."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    n = 400
    label = np.where(rng.random(n) < 0.75, "control", "disease")
    x = (label == "disease")[:, None] * 0.8 + rng.normal(size=(n, 4))
    obs = pd.DataFrame({"label": label, "split": np.where(rng.random(n) < 0.6, "train", "test")})
    obs.index = [f"c{i}" for i in range(n)]
    adata = anndata.AnnData(X=x.astype(np.float32), obs=obs)
    context = RunContext(seed=0, adata=adata, roles=DataRoles(label_key="label"))
    context.model = model = _LogisticOnExpression().fit(context)
    metrics = ClassificationEvaluator(plot=False).evaluate(context).metrics

    test = (obs["split"] == "test").to_numpy()
    truth, train = label[test], label[~test]
    majority = pd.Series(train).value_counts().idxmax()
    assert majority == "control"
    # Brute force: the majority classifier scored directly, chance from the two frequency vectors.
    assert metrics["accuracy_majority"] == pytest.approx(np.mean(truth == majority))
    assert metrics["balanced_accuracy_majority"] == pytest.approx(0.5)
    assert metrics["macro_f1_majority"] == pytest.approx(
        f1_score(truth, [majority] * len(truth), average="macro")
    )
    p = np.array([np.mean(truth == c) for c in ("control", "disease")])
    q = np.array([np.mean(train == c) for c in ("control", "disease")])
    assert metrics["accuracy_chance"] == pytest.approx(float(p @ q))
    assert metrics["macro_f1_chance"] == pytest.approx(float(np.mean(2 * p * q / (p + q))))
    # A random guesser with the training frequencies reaches the chance figures in expectation.
    guesses = rng.choice(["control", "disease"], size=(200, len(truth)), p=q)
    assert np.mean([np.mean(g == truth) for g in guesses]) == pytest.approx(
        metrics["accuracy_chance"], abs=0.01
    )
    assert np.mean([f1_score(truth, g, average="macro") for g in guesses]) == pytest.approx(
        metrics["macro_f1_chance"], abs=0.02
    )
    scores = model.predict_proba(adata[test])[:, 1]
    assert metrics["auroc"] == pytest.approx(roc_auc_score(truth == "disease", scores))
    assert metrics["auroc_chance"] == 0.5


class _LogisticOnExpression(Model):
    name = "logistic_test"
    input_kind = "adata"

    def fit(self, context: RunContext) -> _LogisticOnExpression:
        from sklearn.linear_model import LogisticRegression

        adata = context.adata
        train = (adata.obs["split"] == "train").to_numpy()
        self.model_ = LogisticRegression().fit(adata.X[train], adata.obs["label"].to_numpy()[train])
        self.classes_ = list(self.model_.classes_)
        return self

    def predict_proba(self, inputs: anndata.AnnData) -> np.ndarray:
        return self.model_.predict_proba(inputs.X)

    def predict(self, inputs: anndata.AnnData) -> np.ndarray:
        return self.model_.predict(inputs.X)


def test_held_out_cells_of_one_class_are_refused():
    """A test set holding one class (a donor split that kept it whole) gives no meaningful F1: refused."""
    adata = expression_data()
    adata.obs["split"] = np.where(adata.obs["cell_type"] == "T cell", "test", "train")
    context = RunContext(seed=0, adata=adata, roles=DataRoles(label_key="cell_type"))
    context.model = Echo()
    with pytest.raises(DataError, match=r"all have cell_type == 'T cell', one of the 3 labels"):
        ClassificationEvaluator().evaluate(context)
