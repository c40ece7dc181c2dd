"""The values passed between stages: cell samples, tokenised cells, interactions, evaluations."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import pandas as pd

from grnx_core.atomic import atomic_path
from grnx_core.errors import DataError

if TYPE_CHECKING:
    import matplotlib.figure


# ---------------------------------------------------------------------------------------------
# Cell samples
# ---------------------------------------------------------------------------------------------


@dataclass
class CellSample:
    """Cells chosen by a sampler: row indices into the AnnData and one weight per chosen cell.

    ``weights`` are what downstream aggregation uses (1 for uniform samples, the inverse-density
    weight for WDS). ``info`` holds small scalar facts about the sampling for tracking.
    """

    indices: np.ndarray
    weights: np.ndarray
    n_cells_total: int
    info: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if self.indices.shape != self.weights.shape:
            raise ValueError(
                f"CellSample needs one weight per index, got {self.indices.shape[0]} indices "
                f"and {self.weights.shape[0]} weights"
            )

    @property
    def n_cells(self) -> int:
        return int(self.indices.shape[0])

    def save(self, path: Path) -> None:
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(
                    handle,
                    indices=self.indices,
                    weights=self.weights,
                    n_cells_total=np.int64(self.n_cells_total),
                    info=np.array(json.dumps(self.info)),
                )

    @classmethod
    def load(cls, path: Path) -> CellSample:
        with np.load(path, allow_pickle=False) as stored:
            return cls(
                indices=stored["indices"],
                weights=stored["weights"],
                n_cells_total=int(stored["n_cells_total"]),
                info=json.loads(str(stored["info"])),
            )


# ---------------------------------------------------------------------------------------------
# Tokenised cells
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenizedCells:
    """Variable-length token sequences, one per cell, stored flat with offsets (CSR style).

    Cell ``i`` has token ids ``input_ids[offsets[i]:offsets[i+1]]`` and, for tokenizers that carry
    values (expression-scaled, binned), ``values`` over the same slice. ``obs`` holds the carried
    per-cell columns (label, donor, cell type, split) with the cell names as index. ``vocabulary``
    maps token id -> gene id (special tokens by their names), ``metadata`` holds the tokenizer's
    settings (pad id, special token ids, max length, ...).
    """

    input_ids: np.ndarray
    offsets: np.ndarray
    obs: pd.DataFrame
    values: np.ndarray | None = None
    vocabulary: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_ids = np.asarray(self.input_ids, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.values is not None:
            self.values = np.asarray(self.values, dtype=np.float32)
            if self.values.shape != self.input_ids.shape:
                raise ValueError("TokenizedCells.values must match input_ids in length")
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.input_ids):
            raise ValueError("TokenizedCells.offsets must start at 0 and end at len(input_ids)")
        if len(self.obs) != self.n_cells:
            raise ValueError(f"TokenizedCells.obs has {len(self.obs)} rows for {self.n_cells} cells")

    @property
    def n_cells(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        start, stop = self.offsets[i], self.offsets[i + 1]
        values = None if self.values is None else self.values[start:stop]
        return self.input_ids[start:stop], values

    def subset(self, indices: np.ndarray) -> TokenizedCells:
        """The given cells, in the given order."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        gather = (
            np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices])
            if len(indices)
            else np.zeros(0, dtype=np.int64)
        )
        return TokenizedCells(
            input_ids=self.input_ids[gather],
            offsets=offsets,
            obs=self.obs.iloc[indices],
            values=None if self.values is None else self.values[gather],
            vocabulary=self.vocabulary,
            metadata=dict(self.metadata),
        )

    def padded(
        self, indices: np.ndarray, pad_id: int = 0, pad_value: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Dense (batch, max length) ids, values and a boolean mask that is True on real tokens."""
        lengths = self.lengths[indices]
        width = int(lengths.max()) if len(indices) else 0
        ids = np.full((len(indices), width), pad_id, dtype=np.int64)
        values = None if self.values is None else np.full((len(indices), width), pad_value, np.float32)
        mask = np.arange(width)[None, :] < lengths[:, None]
        for row, i in enumerate(indices):
            start, stop = self.offsets[i], self.offsets[i + 1]
            ids[row, : stop - start] = self.input_ids[start:stop]
            if values is not None:
                assert self.values is not None  # values is None exactly when self.values is
                values[row, : stop - start] = self.values[start:stop]
        return ids, values, mask

    def save(self, path: Path) -> None:
        """Write to a folder (npy arrays, parquet obs, json metadata), atomically."""
        with atomic_path(path, directory=True) as folder:
            np.save(folder / "input_ids.npy", self.input_ids)
            np.save(folder / "offsets.npy", self.offsets)
            if self.values is not None:
                np.save(folder / "values.npy", self.values)
            self.obs.to_parquet(folder / "obs.parquet")
            (folder / "meta.json").write_text(
                json.dumps({"vocabulary": self.vocabulary, "metadata": self.metadata}),
                encoding="utf-8",
            )

    @staticmethod
    def load_lengths(path: Path) -> np.ndarray:
        """The number of tokens of each cell in a folder ``save`` wrote, without reading the tokens."""
        return np.diff(np.load(Path(path) / "offsets.npy", allow_pickle=False))

    @classmethod
    def load(cls, path: Path, mmap: bool = True) -> TokenizedCells:
        mode: Literal["r"] | None = "r" if mmap else None
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        values_path = path / "values.npy"
        return cls(
            input_ids=np.load(path / "input_ids.npy", mmap_mode=mode, allow_pickle=False),
            offsets=np.load(path / "offsets.npy", allow_pickle=False),
            obs=pd.read_parquet(path / "obs.parquet"),
            values=np.load(values_path, mmap_mode=mode, allow_pickle=False) if values_path.exists() else None,
            vocabulary=meta["vocabulary"],
            metadata=meta["metadata"],
        )


class CellAttention(NamedTuple):
    """One cell's attention map over its genes, as attention models yield it.

    ``cell`` is the row of the TokenizedCells, ``token_ids`` the cell's tokens in sequence order
    (special tokens only when asked for), ``attention[a, b]`` the attention token ``a`` pays to
    token ``b``, averaged over the chosen layers and heads (float32, diagonal kept; usually a
    read-only-by-convention view into its batch's array, so copy it before modifying it).
    """

    cell: int
    token_ids: np.ndarray
    attention: np.ndarray


# ---------------------------------------------------------------------------------------------
# Interactions
# ---------------------------------------------------------------------------------------------

INTERACTION_COLUMNS = ("source", "target", "score")


def pair_ids(source: pd.Series | np.ndarray, target: pd.Series | np.ndarray, directed: bool) -> np.ndarray:
    """Canonical pair identifiers: "A|B", with A < B when the pairs are undirected."""
    source = np.asarray(source, dtype=str)
    target = np.asarray(target, dtype=str)
    if not directed:
        swap = source > target
        source, target = np.where(swap, target, source), np.where(swap, source, target)
    return np.char.add(np.char.add(source, "|"), target)


class Interactions:
    """A ranked table of gene pairs: ``source``, ``target``, ``score`` and optional ``pvalue``, ``sign``.

    Rows are sorted by score, descending, with ties kept in a deterministic order (the order the
    extractor produced them). Gene ids match ``adata.var_names``. For undirected interactions each
    pair appears once with ``source < target`` in the extractor's gene order.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        *,
        directed: bool,
        extractor: str,
        genes: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        _ranked: bool = False,
    ) -> None:
        missing = [c for c in INTERACTION_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"Interactions table lacks columns {missing}")
        if _ranked:  # from_matrix built it, ranked and indexed: nobody else holds it
            self.table = table
        else:  # sorted into a new frame: the caller's table stays theirs
            order = np.argsort(-table["score"].to_numpy(dtype=np.float64), kind="stable")
            self.table = table.iloc[order].reset_index(drop=True)
        self.directed = directed
        self.extractor = extractor
        self.genes = (
            list(genes)
            if genes is not None
            else sorted(set(self.table["source"]).union(self.table["target"]))
        )
        self.metadata = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        kind = "directed" if self.directed else "undirected"
        return f"Interactions({len(self)} {kind} pairs from {self.extractor!r}, {len(self.genes)} genes)"

    @classmethod
    def from_matrix(
        cls,
        matrix: np.ndarray,
        genes: list[str] | pd.Index,
        *,
        directed: bool,
        extractor: str,
        rank_by: str = "value",
        pvalues: np.ndarray | None = None,
        top_k: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Interactions:
        """Rank the off-diagonal entries of a gene x gene score matrix.

        ``rank_by="abs"`` ranks by magnitude and keeps the sign of each value in ``sign``.
        Undirected matrices contribute their upper triangle only; NaN entries are dropped.
        ``top_k`` keeps the best pairs only, without sorting the rest.
        """
        matrix = np.asarray(matrix)
        genes = list(genes)
        n_genes = len(genes)
        if matrix.shape != (n_genes, n_genes):
            raise ValueError(f"score matrix shape {matrix.shape} does not match {n_genes} genes")
        if rank_by not in ("value", "abs"):
            raise ValueError(f"rank_by must be 'value' or 'abs', got {rank_by!r}")
        # Pairs in row-major matrix order (the order ties keep): a boolean mask reads the matrix
        # sequentially, several times faster than gathering matrix[rows, cols].
        pairs = (
            ~np.eye(n_genes, dtype=bool)
            if directed
            else np.triu(np.ones((n_genes, n_genes), dtype=bool), k=1)
        )
        values = matrix[pairs].astype(np.float64)
        pairs &= ~np.isnan(matrix)
        rows, cols = (index.astype(np.int32) for index in np.nonzero(pairs))
        values = values[~np.isnan(values)]
        score = np.abs(values) if rank_by == "abs" else values
        if top_k is not None and top_k < len(score):
            # argpartition then a stable sort of the kept ones: ties stay in matrix order.
            kept = np.sort(np.argpartition(-score, top_k - 1)[:top_k])
            rows, cols, values, score = rows[kept], cols[kept], values[kept], score[kept]
        # Rank the numbers before the gene names exist as columns: reordering a table of Python
        # strings costs more than building it (12.5M pairs of 5,000 genes).
        order = np.argsort(-score, kind="stable")
        rows, cols, values, score = rows[order], cols[order], values[order], score[order]
        names = np.asarray(genes, dtype=object)
        table = pd.DataFrame({"source": names[rows], "target": names[cols], "score": score})
        if rank_by == "abs":
            table["sign"] = np.sign(values).astype(np.int8)
        if pvalues is not None:
            table["pvalue"] = np.asarray(pvalues)[rows, cols]
        return cls(
            table, directed=directed, extractor=extractor, genes=genes, metadata=metadata, _ranked=True
        )

    def pair_ids(self) -> np.ndarray:
        return pair_ids(self.table["source"], self.table["target"], self.directed)

    def top(self, k: int) -> Interactions:
        return Interactions(
            self.table.head(k),
            directed=self.directed,
            extractor=self.extractor,
            genes=self.genes,
            metadata=self.metadata,
        )

    def save(self, path: Path) -> None:
        """Parquet with the metadata (directed, extractor, genes) in the schema, written atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(self.table, preserve_index=False)
        extra = {
            b"grnx": json.dumps(
                {
                    "directed": self.directed,
                    "extractor": self.extractor,
                    "genes": self.genes,
                    "metadata": self.metadata,
                }
            ).encode()
        }
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
        with atomic_path(path) as temporary:
            pq.write_table(table, temporary)

    @classmethod
    def load(cls, path: Path) -> Interactions:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"grnx"])
        return cls(
            table.to_pandas(),
            directed=meta["directed"],
            extractor=meta["extractor"],
            genes=meta["genes"],
            metadata=meta["metadata"],
        )


# ---------------------------------------------------------------------------------------------
# Ground truth and evaluation results
# ---------------------------------------------------------------------------------------------


@dataclass
class GroundTruth:
    """A reference network: ``edges`` with columns source, target and optionally sign (+1/-1)."""

    edges: pd.DataFrame
    directed: bool
    name: str

    def __post_init__(self) -> None:
        missing = {"source", "target"} - set(self.edges.columns)
        if missing:
            raise DataError(
                f"Ground truth {self.name!r} needs columns 'source' and 'target'; "
                f"missing {sorted(missing)} (found {list(self.edges.columns)})."
            )
        edges = self.edges[self.edges["source"] != self.edges["target"]].copy()
        edges["pair"] = pair_ids(edges["source"], edges["target"], self.directed)
        self.edges = edges.drop_duplicates("pair").reset_index(drop=True)

    @property
    def genes(self) -> set[str]:
        return set(self.edges["source"]).union(self.edges["target"])

    def pair_set(self) -> set[str]:
        return set(self.edges["pair"])


@dataclass
class EvaluationResult:
    """Metrics (name -> value), and optionally figures and tables to log as artifacts.

    ``state`` holds what an evaluator's ``aggregate`` needs from each repeat beyond its metrics
    (e.g. the identities of the top pairs); it is handed to ``aggregate`` and never logged.
    """

    metrics: dict[str, float]
    figures: dict[str, matplotlib.figure.Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
