"""Perturbed copies of tokenised cells (in silico deletion and overexpression), built from the tokens.

Geneformer (``geneformer/perturber_utils.py``: ``delete_indices``, ``overexpress_indices``,
``overexpress_indices_special``, ``overexpress_tokens``, ``calc_n_overflow``,
``truncate_by_n_overflow``; read at github.com/haroonshakeel/Geneformer) edits Hugging Face
``datasets`` rows one ``map`` call at a time. Here a perturbation is an edit of the existing
:class:`TokenizedCells` arrays, never a re-tokenisation of the AnnData:

* ``delete``: the gene's token is removed (every occurrence: a rank-value cell can hold one gene
  twice when duplicated ids are not summed; Geneformer removes one occurrence per index).
* ``overexpress``: the gene moves to the front of the rank-value sequence, after any leading
  special token (``<cls>``), as Geneformer's ``overexpress_indices_special`` does; other
  occurrences are dropped. A gene absent from the cell is inserted there (Geneformer's
  ``overexpress_tokens``); when that makes the cell longer than the model input size, the last
  genes before any trailing special token (``<eos>``) are cut, and the *comparison original* is
  cut of the same genes, so both sides hold the same other genes (Geneformer truncates the original
  by the same count from its end, which cuts a different gene when the overexpressed gene was present).

A perturbation that leaves the cell unchanged (overexpressing the gene already first; Geneformer's
``range_start = 1``) or leaves no gene at all is not made. Every copy records which comparison
original it is compared with and, for each of its tokens, that token's position in the original
(-1 for the perturbed genes), so the other genes' states can be compared one to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from grnx_core import DataError, TokenizedCells


@dataclass
class PerturbedBatch:
    """Perturbed copies of some cells, with the originals they are compared with.

    ``perturbed``: one row per copy; ``compare_with[k]``: the row of ``originals`` copy k is compared
    with; ``target[k]``: which perturbation (gene or group) copy k applies; ``origin``: aligned with
    ``perturbed.input_ids``, each token's position in its comparison original (-1: a perturbed
    gene). ``originals``: the unperturbed cells (plus a cut copy where an insertion overflowed);
    ``original_cell[r]``: the row of the input tokens original r comes from.
    """

    perturbed: TokenizedCells
    compare_with: np.ndarray
    target: np.ndarray
    origin: np.ndarray
    originals: TokenizedCells
    original_cell: np.ndarray

    @property
    def n_copies(self) -> int:
        return self.perturbed.n_cells


@dataclass
class PerturbationBuilder:
    """Collects perturbed copies of cells and their comparison originals (each original once), then
    packs them into a :class:`PerturbedBatch`."""

    tokens: TokenizedCells
    ids: list[np.ndarray] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)
    origins: list[np.ndarray] = field(default_factory=list)
    lengths: list[np.ndarray] = field(default_factory=list)
    compare_with: list[np.ndarray] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    original_ids: list[np.ndarray] = field(default_factory=list)
    original_values: list[np.ndarray] = field(default_factory=list)
    original_cell: list[int] = field(default_factory=list)
    _row_of: dict[tuple[int, bytes], int] = field(default_factory=dict)

    @property
    def n_copies(self) -> int:
        return int(sum(len(lengths) for lengths in self.lengths))

    def original(self, cell: int, cut: np.ndarray | None = None) -> int:
        """Row of the comparison original: the cell, or the cell without the positions ``cut``."""
        key = (cell, b"" if cut is None else np.asarray(cut, dtype=np.int64).tobytes())
        row = self._row_of.get(key)
        if row is None:
            ids, values = self.tokens.cell(cell)
            ids = np.asarray(ids, dtype=np.int64)
            if cut is not None and len(cut):
                keep = np.ones(len(ids), dtype=bool)
                keep[cut] = False
                ids = ids[keep]
                values = None if values is None else np.asarray(values)[keep]
            row = len(self.original_cell)
            self._row_of[key] = row
            self.original_ids.append(ids)
            if values is not None:
                self.original_values.append(np.asarray(values, dtype=np.float32))
            self.original_cell.append(cell)
        return row

    def add(
        self,
        ids: np.ndarray,
        values: np.ndarray | None,
        origin: np.ndarray,
        lengths: np.ndarray,
        compare_with: int,
        targets: np.ndarray,
    ) -> None:
        self.ids.append(np.asarray(ids, dtype=np.int64))
        if values is not None:
            self.values.append(np.asarray(values, dtype=np.float32))
        self.origins.append(np.asarray(origin, dtype=np.int64))
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.compare_with.append(np.full(len(lengths), compare_with, dtype=np.int64))
        self.targets.append(np.asarray(targets, dtype=np.int64))

    def build(self) -> PerturbedBatch:
        has_values = self.tokens.values is not None
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        n_copies = len(lengths)

        def cells(ids: list[np.ndarray], values: list[np.ndarray], lengths: np.ndarray, prefix: str):
            flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
            return TokenizedCells(
                input_ids=flat,
                offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                obs=pd.DataFrame(index=pd.RangeIndex(len(lengths)).astype(str).map(lambda i: f"{prefix}{i}")),
                values=(np.concatenate(values) if values else np.zeros(0, np.float32))
                if has_values
                else None,
                vocabulary=self.tokens.vocabulary,
                metadata=dict(self.tokens.metadata),
            )

        original_lengths = np.array([len(ids) for ids in self.original_ids], dtype=np.int64)
        return PerturbedBatch(
            perturbed=cells(self.ids, self.values, lengths, "perturbed"),
            compare_with=np.concatenate(self.compare_with) if n_copies else np.zeros(0, dtype=np.int64),
            target=np.concatenate(self.targets) if n_copies else np.zeros(0, dtype=np.int64),
            origin=np.concatenate(self.origins) if self.origins else np.zeros(0, dtype=np.int64),
            originals=cells(self.original_ids, self.original_values, original_lengths, "original"),
            original_cell=np.asarray(self.original_cell, dtype=np.int64),
        )


def leading_specials(ids: np.ndarray, special: np.ndarray) -> int:
    """How many special tokens (``<cls>``) open the cell: overexpressed genes go right after them."""
    flags = np.isin(ids, special)
    return int(np.argmin(flags)) if not flags.all() else len(ids)


def each_present_gene(
    builder: PerturbationBuilder,
    cells: np.ndarray,
    kind: str,
    special_ids: list[int],
    target_of_token: np.ndarray,
) -> None:
    """Add one copy per cell and per distinct gene of it that has a target
    (``target_of_token[id] >= 0``), that gene deleted or moved to the front; vectorised over the
    genes of a cell."""
    tokens = builder.tokens
    special = np.asarray(special_ids, dtype=np.int64)
    for cell in np.asarray(cells, dtype=np.int64):
        ids, values = tokens.cell(int(cell))
        ids = np.asarray(ids, dtype=np.int64)
        is_gene = ~np.isin(ids, special)
        inside = ids < len(target_of_token)
        gene_positions = np.flatnonzero(is_gene & inside)
        gene_positions = gene_positions[target_of_token[ids[gene_positions]] >= 0]
        genes, first = np.unique(ids[gene_positions], return_index=True)
        if len(genes) == 0:
            continue
        first_position = gene_positions[first]
        length = len(ids)
        columns = np.arange(length)[None, :]
        if kind == "delete":
            order = np.broadcast_to(columns, (len(genes), length))
            keep = ids[None, :] != genes[:, None]
            moved = np.full(len(genes), -1)
            # deleting a cell's only gene leaves nothing to embed
            left = (keep & is_gene[None, :]).any(axis=1)
            if not left.all():
                genes, order, keep, moved = genes[left], order[left], keep[left], moved[left]
            if len(genes) == 0:
                continue
        else:
            start = leading_specials(ids, special)
            moved = first_position[:, None]
            order = np.where((columns > start) & (columns <= moved), columns - 1, columns)
            order[:, start] = first_position
            # other occurrences of the moved gene go
            keep = ~((ids[order] == genes[:, None]) & (order != moved))
            moved = first_position
            unchanged = (first_position == start) & keep.all(axis=1)
            if unchanged.any():
                genes, order, keep, moved = (
                    genes[~unchanged],
                    order[~unchanged],
                    keep[~unchanged],
                    moved[~unchanged],
                )
            if len(genes) == 0:
                continue
        origin = np.where(order == moved[:, None], -1, order)[keep]
        row = builder.original(int(cell))
        builder.add(
            ids[order][keep],
            None if values is None else np.asarray(values)[order][keep],
            origin,
            keep.sum(axis=1),
            row,
            target_of_token[genes],
        )


def chosen_genes(
    builder: PerturbationBuilder,
    requests: list[tuple[int, np.ndarray, int]],
    kind: str,
    special_ids: list[int],
    max_length: int | None,
) -> None:
    """Add one copy per request ``(cell, token ids, target)``: those genes deleted together, or
    moved (inserted when absent) to the front in the given order, cut to ``max_length`` tokens."""
    tokens = builder.tokens
    special = np.asarray(special_ids, dtype=np.int64)
    for cell, group, target in requests:
        ids, values = tokens.cell(int(cell))
        ids = np.asarray(ids, dtype=np.int64)
        group = np.asarray(group, dtype=np.int64)
        present = np.isin(ids, group)
        positions = np.arange(len(ids))
        if kind == "delete":
            keep = ~present
            if keep.all() or not (keep & ~np.isin(ids, special)).any():
                continue  # nothing deleted, or nothing left
            builder.add(
                ids[keep],
                None if values is None else np.asarray(values)[keep],
                positions[keep],
                np.array([int(keep.sum())]),
                builder.original(int(cell)),
                np.array([target]),
            )
            continue
        if values is not None:
            raise DataError(
                "overexpress moves a gene to the front of a rank-value sequence; these tokens carry "
                "expression values, whose order means nothing to the model. Use perturb_type: delete."
            )
        start = leading_specials(ids, special)
        rest = positions[~present]
        prefix, body = rest[:start], rest[start:]
        trailing = 0
        while trailing < len(body) and np.isin(ids[body[len(body) - 1 - trailing]], special):
            trailing += 1
        cut = np.zeros(0, dtype=np.int64)
        n_tokens = len(prefix) + len(group) + len(body)
        if max_length is not None and n_tokens > max_length:
            overflow = n_tokens - max_length
            genes_in_body = len(body) - trailing
            if overflow > genes_in_body:
                raise DataError(
                    f"overexpressing {len(group)} genes cannot fit cell {str(tokens.obs.index[cell])!r} "
                    f"into the model's {max_length} tokens. Perturb fewer genes at once."
                )
            cut = body[genes_in_body - overflow : genes_in_body]
            body = np.concatenate([body[: genes_in_body - overflow], body[genes_in_body:]])
        new_ids = np.concatenate([ids[prefix], group, ids[body]])
        if len(new_ids) == len(ids) and np.array_equal(new_ids, ids):
            continue  # already first: overexpressing changes nothing
        origin = np.concatenate([prefix, np.full(len(group), -1), body])
        row = builder.original(int(cell), np.sort(cut) if len(cut) else None)
        if len(cut):
            # positions in the cut original: genes before the cut keep theirs, trailing specials move up
            shift = np.searchsorted(np.sort(cut), origin, side="left")
            origin = np.where(origin >= 0, origin - shift, -1)
        builder.add(new_ids, None, origin, np.array([len(new_ids)]), row, np.array([target]))
