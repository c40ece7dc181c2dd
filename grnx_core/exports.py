"""Interactions written in other tools' formats: BEELINE, AnnData ``varp``, openproblems GRN.

Each writer is a pure function from an :class:`Interactions` to one file, written through a
temporary file renamed into place. Formats:

- ``beeline``: BEELINE's ``rankedEdges.csv`` (Pratapa et al. 2020; Murali-group/Beeline,
  BLRun/runner.py ``_write_ranked_edges``): tab-separated ``Gene1, Gene2, EdgeWeight``, best first.
  BEELINE ranks by ``|EdgeWeight|`` (BLEval/computeAUC.py), so the weight is the score carrying
  the pair's sign when the list has one. An undirected list is written in both orientations with
  the same weight, as BEELINE's own Pearson runner (BLRun/pearsonRunner.py) writes its matrix.
- ``varp``: an ``.h5ad`` with no cells whose ``var_names`` are the interactions' genes and whose
  ``varp["grnx_<extractor>"]`` is the genes x genes sparse matrix of scores (symmetric when
  undirected; a pair scored 0 and an unlisted pair look the same), provenance in ``uns["grnx"]``.
- ``openproblems``: the GRN prediction of openproblems' task_grn_inference
  (src/api/file_prediction_h5ad.yaml): an ``.h5ad`` with ``uns["prediction"]`` a table
  ``source, target, weight`` and the strings ``uns["method_id"]``, ``uns["dataset_id"]``. Values
  are stored as strings, as the task's docs and methods do; its metrics read them back with
  ``pd.to_numeric``, rank by ``|weight|`` and keep the top ``max_n_links`` (50,000) rows, so an
  undirected list (two rows per pair) is best cut with ``top_k``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path
from grnx_core.data_types import Interactions
from grnx_core.errors import DataError

ExportFormat = Literal["beeline", "varp", "openproblems"]
EXPORT_FORMATS: tuple[str, ...] = ("beeline", "varp", "openproblems")


def _checked(interactions: Interactions, what: str) -> pd.DataFrame:
    """The table, refused when empty or holding scores a format cannot carry (NaN)."""
    table = interactions.table
    if len(table) == 0:
        raise DataError(
            f"the interactions of {interactions.extractor!r} hold no pairs: there is nothing to write as {what}."
        )
    missing = int(table["score"].isna().sum())
    if missing:
        raise DataError(
            f"{missing} of the {len(table)} pairs of {interactions.extractor!r} have no score (NaN); "
            f"{what} has no place for them. Drop them (or rerun the extractor) before exporting."
        )
    return table


def signed_weights(interactions: Interactions, what: str) -> np.ndarray:
    """Weights whose magnitude ranks like ``score``: the score, with the pair's sign when known.

    Tools that rank by ``|weight|`` (BEELINE, openproblems) would reorder negative scores, so
    those are refused rather than written in an order that is not the list's.
    """
    table = _checked(interactions, what)
    scores = table["score"].to_numpy(dtype=np.float64)
    negative = int((scores < 0).sum())
    if negative:
        raise DataError(
            f"{what} ranks edges by |weight|, but {negative} of the {len(scores)} pairs of "
            f"{interactions.extractor!r} have negative scores (lowest {scores.min():.4g}), so |weight| "
            "would rank them differently from the list. Rerun the extractor with rank_by: abs (the "
            "sign goes to the 'sign' column and is written into the weight)."
        )
    if "sign" in table.columns:
        return scores * table["sign"].to_numpy(dtype=np.float64)
    return scores


def _edges(interactions: Interactions, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, target, weight) best first; an undirected pair followed by its reverse."""
    source = interactions.table["source"].astype(str).to_numpy()
    target = interactions.table["target"].astype(str).to_numpy()
    if not interactions.directed:
        source, target = (
            np.column_stack([source, target]).ravel(),
            np.column_stack([target, source]).ravel(),
        )
        weights = np.repeat(weights, 2)
    return source, target, weights


def write_beeline(interactions: Interactions, path: str | Path) -> Path:
    """BEELINE ``rankedEdges.csv`` (see the module docstring); returns the path written."""
    weights = signed_weights(interactions, "BEELINE's rankedEdges.csv")
    source, target, weights = _edges(interactions, weights)
    edges = pd.DataFrame({"Gene1": source, "Gene2": target, "EdgeWeight": weights})
    path = Path(path)
    with atomic_path(path) as temporary:
        edges.to_csv(temporary, sep="\t", index=False)
    return path


def _provenance(interactions: Interactions) -> dict[str, str | bool | int]:
    direction = interactions.metadata.get("direction")
    if direction is None:
        direction = "source -> target" if interactions.directed else "undirected"
    return {
        "extractor": interactions.extractor,
        "directed": bool(interactions.directed),
        "direction": str(direction),
        "n_pairs": len(interactions),
    }


def write_varp(interactions: Interactions, path: str | Path, key: str | None = None) -> Path:
    """An ``.h5ad`` (0 cells x the interactions' genes) with the score matrix in ``varp[key]``."""
    import anndata as ad
    import scipy.sparse as sp

    table = _checked(interactions, "an AnnData varp matrix")
    key = key or f"grnx_{interactions.extractor}"
    genes = pd.Index([str(g) for g in interactions.genes])
    if genes.has_duplicates:
        repeated = genes[genes.duplicated()].unique().tolist()
        raise DataError(
            f"the genes of {interactions.extractor!r} repeat {repeated[:5]}: var_names must be unique."
        )
    rows = genes.get_indexer(table["source"].astype(str))
    cols = genes.get_indexer(table["target"].astype(str))
    unknown = (rows < 0) | (cols < 0)
    if unknown.any():
        example = table.loc[unknown, ["source", "target"]].iloc[0].tolist()
        raise DataError(
            f"{int(unknown.sum())} pairs of {interactions.extractor!r} name genes outside its gene list "
            f"(e.g. {example}); the interactions are inconsistent, rerun the extractor."
        )
    scores = table["score"].to_numpy(dtype=np.float64)
    if not interactions.directed:
        rows, cols, scores = np.r_[rows, cols], np.r_[cols, rows], np.r_[scores, scores]
    matrix = sp.csr_matrix((scores, (rows, cols)), shape=(len(genes), len(genes)))
    adata = ad.AnnData(obs=pd.DataFrame(index=pd.Index([], dtype=str)), var=pd.DataFrame(index=genes))
    adata.varp[key] = matrix
    adata.uns["grnx"] = {**_provenance(interactions), "varp_key": key, "values": "score"}
    path = Path(path)
    with atomic_path(path) as temporary:
        adata.write_h5ad(temporary)
    return path


def write_openproblems(
    interactions: Interactions, path: str | Path, *, method_id: str, dataset_id: str
) -> Path:
    """openproblems task_grn_inference prediction ``.h5ad`` (see the module docstring)."""
    import anndata as ad

    for name, value in (("method_id", method_id), ("dataset_id", dataset_id)):
        if not value or not str(value).strip():
            raise DataError(
                f"the openproblems format needs a non-empty {name}, got {value!r} (grnx export: "
                f"--{name.replace('_', '-')})."
            )
    weights = signed_weights(interactions, "the openproblems GRN format")
    source, target, weights = _edges(interactions, weights)
    # repr() keeps every float's digits; the task's methods store the columns as strings.
    prediction = pd.DataFrame(
        {"source": source, "target": target, "weight": [repr(float(w)) for w in weights]}
    )
    adata = ad.AnnData(
        uns={
            "method_id": str(method_id),
            "dataset_id": str(dataset_id),
            "prediction": prediction,
            "grnx": _provenance(interactions),
        }
    )
    path = Path(path)
    with atomic_path(path) as temporary:
        adata.write_h5ad(temporary)
    return path


def export_interactions(
    interactions: Interactions,
    path: str | Path,
    format: str,
    *,
    top_k: int | None = None,
    method_id: str | None = None,
    dataset_id: str | None = None,
) -> Path:
    """Write ``interactions`` (its best ``top_k`` pairs when given) to ``path`` in ``format``."""
    if top_k is not None:
        if top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}.")
        interactions = interactions.top(top_k)
    if format == "beeline":
        return write_beeline(interactions, path)
    if format == "varp":
        return write_varp(interactions, path)
    if format == "openproblems":
        return write_openproblems(
            interactions,
            path,
            method_id=method_id or f"grnx_{interactions.extractor}",
            dataset_id=dataset_id or "",
        )
    raise DataError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
