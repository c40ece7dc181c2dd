"""The gene universe of a pairwise extractor: which genes its pairs are drawn from.

Every pairwise extractor takes ``genes:``, an explicit universe (a list of gene ids, or a text
file with one gene id per line, ``#`` comments allowed), next to its own top-N rules. An explicit
universe makes repeats, the full-data reference and different methods score the same pairs.
Depth-dependent methods still compute depth over every gene of the data, never the universe.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import Field

from grnx_core import ComponentParams, DataError

GENES_DESCRIPTION = (
    "explicit gene universe: a list of gene ids, or a text file with one gene id per line "
    "(relative to the current directory); overrides the top-N rules; None uses them"
)


class UniverseParams(ComponentParams):
    """Mix into an extractor's ``Params`` to give it the ``genes`` field."""

    genes: list[str] | str | None = Field(None, description=GENES_DESCRIPTION)


def universe_file(genes: list[str] | str | None) -> list[Path]:
    """The file a ``genes`` value names, for ``input_files()`` (validation and cache keys)."""
    return [Path(genes).expanduser()] if isinstance(genes, str) else []


def read_gene_list(path: str, where: str) -> list[str]:
    """Gene ids from a text file: one per line, blank lines and ``#`` comments skipped."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"{where}: gene list file {path!r} not found (resolved to {file.resolve()}). Relative paths "
            "resolve from the current directory; give a file with one gene id per line, or a list."
        )
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{where}: gene list file {path!r} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "it should hold one gene id per line. A gzip file must be unpacked first."
        ) from None
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DataError(f"{where}: gene list file {path!r} names no genes; write one gene id per line.")
    return names


def universe_indices(
    genes: list[str] | str | None, available: Sequence[str], where: str
) -> np.ndarray | None:
    """Positions in ``available`` of the explicit universe, in the data's gene order; None when unset.

    Refuses duplicated names, fewer than 2 genes found, and genes absent from the data: a
    universe that silently shrinks would score a different set of pairs than the user named.
    """
    if genes is None:
        return None
    names = read_gene_list(genes, where) if isinstance(genes, str) else [str(name) for name in genes]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise DataError(
            f"{where}: params.genes names {', '.join(map(repr, repeated[:5]))} more than once; "
            "list each gene once."
        )
    position = {str(name): index for index, name in enumerate(available)}
    missing = [name for name in names if name not in position]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} of the {len(names)} genes of params.genes are not in the data "
            f"(e.g. {', '.join(map(repr, missing[:5]))}; the data has {len(position)} genes such as "
            f"{', '.join(map(repr, list(position)[:3]))}). Use the data's gene ids (var_names; map "
            "symbols with the map_gene_ids preprocessor) or drop those genes from the list."
        )
    if len(names) < 2:
        raise DataError(f"{where}: params.genes names {len(names)} gene; pairs need at least 2.")
    return np.sort(np.fromiter((position[name] for name in names), dtype=np.int64, count=len(names)))


def universe_name(
    genes: list[str] | str | None, universe_cells: str, n_universe: int, n_data_genes: int
) -> str:
    """How the gene universe was chosen, for the interactions' metadata."""
    if genes is not None:
        return "genes"
    if n_universe < n_data_genes:
        return f"top_genes_of_{universe_cells}_cells"
    return "all_genes"
