"""The bad-data corpus: small bad input files and the recipe that reads them, one case a row.

Each :class:`Case` writes its files into an empty folder (binary inputs such as h5ad and gzip are
built here rather than committed) and names the words the error must contain: where the problem
is, what was expected or found, and what to do. ``tests/core/test_bad_data.py`` runs
``grnx run recipe.yaml --no-track --no-cache`` in that folder and wants exit status 2, no
traceback and every expected fragment. Add a case for every crash or silent result found on
real data.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

Files = dict[str, "str | bytes | Callable[[Path], None]"]


@dataclass(frozen=True)
class Case:
    id: str
    recipe: str  # the recipe's sections after schema_version and name
    expect: tuple[str, ...]
    files: Files = field(default_factory=dict)

    def write(self, folder: Path) -> Path:
        for name, content in self.files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(path)
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        recipe = folder / "recipe.yaml"
        recipe.write_text(f"schema_version: 1\nname: bad_data_{self.id}\n{self.recipe.strip()}\n")
        return recipe


# -- inputs -------------------------------------------------------------------------------------

#: Krumsiek's myeloid model (scanpy's bundled krumsiek11): 11 genes, shipped with its network.
KRUMSIEK = "data: {name: scanpy_builtin, params: {dataset: krumsiek11}}"


def _mtx(path: Path, n_genes: int = 3, n_cells: int = 4) -> None:
    """A genes x cells Matrix Market file of small counts (10x's layout)."""
    rows, cols = np.nonzero(np.ones((n_genes, n_cells)))
    lines = [
        "%%MatrixMarket matrix coordinate integer general",
        f"{n_genes} {n_cells} {len(rows)}",
        *(f"{r + 1} {c + 1} {1 + (r + c) % 3}" for r, c in zip(rows, cols)),
    ]
    path.write_text("\n".join(lines) + "\n")


def _real_mtx_with(value: str):
    """A genes x cells Matrix Market file of real values, one of them ``value`` (gene 2, cell 3)."""

    def write(path: Path) -> None:
        entries = [(1, 1, "1"), (2, 3, value), (3, 4, "2")]
        lines = [
            "%%MatrixMarket matrix coordinate real general",
            f"3 4 {len(entries)}",
            *(f"{gene} {cell} {text}" for gene, cell, text in entries),
        ]
        path.write_text("\n".join(lines) + "\n")

    return write


def _h5ad_with_value(value: float, sparse: bool = True):
    """An h5ad of small counts with ``value`` for cell 'AAAT-1' and gene 'C'."""

    def write(path: Path) -> None:
        import anndata
        import pandas as pd
        import scipy.sparse as sp

        counts = np.arange(12, dtype=np.float32).reshape(4, 3) % 5
        counts[3, 2] = value
        adata = anndata.AnnData(
            X=sp.csr_matrix(counts) if sparse else counts,
            obs=pd.DataFrame(index=["AAAC-1", "AAAG-1", "AAAA-1", "AAAT-1"]),
            var=pd.DataFrame(index=["A", "B", "C"]),
        )
        adata.write_h5ad(path)

    return write


def _gzip(text: str) -> bytes:
    return gzip.compress(text.encode())


FEATURES = "ENSG01\tA\tGene Expression\nENSG02\tB\tGene Expression\nENSG03\tC\tGene Expression\n"


def _h5ad_with_repeated_cells(path: Path) -> None:
    import warnings

    import anndata
    import pandas as pd

    counts = np.arange(12, dtype=np.float32).reshape(4, 3) % 5
    with warnings.catch_warnings():  # anndata warns about the repeated names we mean to write
        warnings.simplefilter("ignore")
        adata = anndata.AnnData(
            X=counts,
            obs=pd.DataFrame(index=["AAAC-1", "AAAG-1", "AAAC-1", "AAAT-1"]),
            var=pd.DataFrame(index=["A", "B", "C"]),
        )
        adata.write_h5ad(path)


def _csv(rows: dict[str, list[float]], genes: list[str]) -> str:
    """A genes x cells table (BEELINE's layout): one column per cell."""
    header = "," + ",".join(rows)
    lines = [header] + [
        f"{gene}," + ",".join(f"{values[g]:g}" for values in rows.values()) for g, gene in enumerate(genes)
    ]
    return "\n".join(lines) + "\n"


GENES5 = ["g1", "g2", "g3", "g4", "g5"]
ZEROS = _csv({f"c{i}": [0] * 5 for i in range(6)}, GENES5)
#: the same three cells twice, once per group: both groups have the same correlations
_cells = [[1, 2, 3, 0, 5], [4, 1, 0, 2, 2], [2, 5, 1, 1, 0]]
TWIN_GROUPS = _csv({f"{g}{i}": cell for g in ("a", "b") for i, cell in enumerate(_cells)}, GENES5)
TWIN_GROUPS_META = "cell,group\n" + "".join(f"{g}{i},{g}\n" for g in ("a", "b") for i in range(3))

DOROTHEA = "tf\tconfidence\ttarget\tmor\nGata1\tA\tPu.1\t-1\nPu.1\tA\tGata1\t-1\n"
#: Krumsiek11's mutual inhibitions: Gata1 -| Pu.1, Pu.1 -| Gata1, Gata1 -| Fli1
BEELINE = "Gene1,Gene2,Type\nGata1,Pu.1,-\nPu.1,Gata1,-\nGata1,Fli1,-\n"


def _ground_truth(path: str, fmt: str, evaluator: str = "auprc") -> str:
    return (
        f"{KRUMSIEK}\nextractors: [{{name: pearson}}]\n"
        f"evaluators: [{{name: {evaluator}, params: {{plot: false, "
        f"ground_truth: {{source: file, path: {path}, format: {fmt}}}}}}}]"
    )


# -- the corpus ---------------------------------------------------------------------------------

CASES: list[Case] = [
    Case(
        "10x_empty_features",
        "data: {name: 10x_mtx, params: {path: sample}}\nextractors: [{name: pearson}]",
        ("features.tsv.gz is empty", "one line per gene", "params.features"),
        {
            "sample/matrix.mtx": _mtx,
            "sample/barcodes.tsv": "c1\nc2\nc3\nc4\n",
            "sample/features.tsv.gz": _gzip(""),
        },
    ),
    Case(
        "10x_empty_barcodes",
        "data: {name: 10x_mtx, params: {path: sample}}\nextractors: [{name: pearson}]",
        ("barcodes file barcodes.tsv is empty", "one line per cell", "params.barcodes"),
        {"sample/matrix.mtx": _mtx, "sample/barcodes.tsv": "", "sample/features.tsv": FEATURES},
    ),
    Case(
        "10x_repeated_barcodes",
        "data: {name: 10x_mtx, params: {path: sample}}\nextractors: [{name: pearson}]",
        ("cell names repeat", "in barcodes.tsv", "'AAAC-1'", "prefix each barcode with its sample"),
        {
            "sample/matrix.mtx": _mtx,
            "sample/barcodes.tsv": "AAAC-1\nAAAG-1\nAAAC-1\nAAAT-1\n",
            "sample/features.tsv": FEATURES,
        },
    ),
    Case(
        "h5ad_repeated_cells",
        "data: {name: h5ad, params: {path: cells.h5ad}}\nextractors: [{name: pearson}]",
        ("cell names repeat", "in obs_names", "'AAAC-1'", "obs_names_make_unique"),
        {"cells.h5ad": _h5ad_with_repeated_cells},
    ),
    Case(
        "csv_repeated_cells",
        "data: {name: csv, params: {path: expr.csv}}\nextractors: [{name: pearson}]",
        ("cell names repeat", "in the header line", "'c1'"),
        {"expr.csv": ",c1,c2,c1\ng1,1,2,3\ng2,0,1,4\n"},
    ),
    Case(
        "ground_truth_empty",
        _ground_truth("truth.tsv", "beeline"),
        ("evaluator 'auprc'", "truth.tsv is empty", "edge table was expected"),
        {"truth.tsv": ""},
    ),
    Case(
        "ground_truth_gzip_empty",
        _ground_truth("truth.tsv", "beeline", evaluator="nes"),
        ("truth.tsv is empty (no lines after decompressing)",),
        {"truth.tsv": _gzip("")},
    ),
    Case(
        "ground_truth_truncated_gzip",
        _ground_truth("truth.tsv", "beeline"),
        ("could not read truth.tsv as an edge table", "EOFError", "download it again"),
        {"truth.tsv": _gzip(BEELINE * 50)[:40]},
    ),
    Case(
        "10x_truncated_features",
        "data: {name: 10x_mtx, params: {path: sample}}\nextractors: [{name: pearson}]",
        ("could not read the genes/features file features.tsv.gz", "one line per gene"),
        {
            "sample/matrix.mtx": _mtx,
            "sample/barcodes.tsv": "c1\nc2\nc3\nc4\n",
            "sample/features.tsv.gz": _gzip(FEATURES * 50)[:30],
        },
    ),
    Case(
        "ground_truth_header_only",
        _ground_truth("truth.csv", "beeline"),
        ("truth.csv lists no edges (a header line only)",),
        {"truth.csv": "Gene1,Gene2\n"},
    ),
    Case(
        "ground_truth_wrong_format",
        _ground_truth("dorothea.tsv", "trrust"),
        ("does not look like a 'trrust' table", "['tf', 'confidence', 'target', 'mor']", "format: dorothea"),
        {"dorothea.tsv": DOROTHEA},
    ),
    Case(
        "ground_truth_gzip_named_tsv_wrong_format",
        _ground_truth("beeline.tsv", "biogrid"),
        ("does not look like a 'biogrid' table", "comma-separated", "set ground_truth.format: beeline"),
        {"beeline.tsv": _gzip(BEELINE)},
    ),
    Case(
        "all_zero_counts",
        "data: {name: csv, params: {path: zeros.csv}}\nextractors: [{name: pearson}]",
        ("extractor 'pearson'", "0 of the 5 genes vary across the 6 cells", "all-zero count matrix"),
        {"zeros.csv": ZEROS},
    ),
    Case(
        "all_zero_counts_spearman",
        "data: {name: csv, params: {path: zeros.csv}}\nextractors: [{name: spearman}]",
        ("extractor 'spearman'", "0 of the 5 genes vary"),
        {"zeros.csv": ZEROS},
    ),
    Case(
        "all_zero_counts_normalised",
        "data: {name: csv, params: {path: zeros.csv}}\n"
        "preprocess: [{name: normalize_total}, {name: log1p}]\nextractors: [{name: pearson}]",
        ("preprocessor 'normalize_total'", "all 6 cells have a total of 0", "right file or layer"),
        {"zeros.csv": ZEROS},
    ),
    # Non-finite and out-of-domain values: refused where they enter or where a step would turn them
    # into NaN, with no numpy RuntimeWarning printed first.
    Case(
        "csv_infinite_count",
        "data: {name: csv, params: {path: expr.csv}}\nextractors: [{name: pearson}]",
        ("data source 'csv'", "1 NaN or infinite value", "inf, for cell 'c2' and gene 'g1'", "Fix the file"),
        {"expr.csv": ",c1,c2,c3,c4\ng1,1,inf,3,0\ng2,0,1,4,2\ng3,2,2,1,5\n"},
    ),
    Case(
        "csv_empty_entry_normalised",
        "data: {name: csv, params: {path: expr.csv, values: normalized}}\nextractors: [{name: pearson}]",
        (
            "1 NaN or infinite value",
            "nan, for cell 'c3' and gene 'g2'",
            "empty entry of a table reads as NaN",
        ),
        {"expr.csv": ",c1,c2,c3,c4\ng1,1,0.5,3,0\ng2,0,1,,2\ng3,2,2,1,5\n"},
    ),
    Case(
        "10x_infinite_count",
        "data: {name: 10x_mtx, params: {path: sample}}\nextractors: [{name: pearson}]",
        ("data source '10x_mtx'", "the matrix holds 1 NaN or infinite value", "cell 'c3' and gene 'B'"),
        {
            "sample/matrix.mtx": _real_mtx_with("inf"),
            "sample/barcodes.tsv": "c1\nc2\nc3\nc4\n",
            "sample/features.tsv": FEATURES,
        },
    ),
    Case(
        "h5ad_nan_count",
        "data: {name: h5ad, params: {path: cells.h5ad}}\nextractors: [{name: pearson}]",
        ("data source 'h5ad'", "'X' holds 1 NaN or infinite value", "nan, for cell 'AAAT-1' and gene 'C'"),
        {"cells.h5ad": _h5ad_with_value(np.nan)},
    ),
    Case(
        "h5ad_backed_infinite_count",
        "data: {name: h5ad, params: {path: cells.h5ad, backed: true}}\nextractors: [{name: pearson}]",
        ("X (its first rows) holds 1 NaN or infinite value", "-inf, for cell 'AAAT-1' and gene 'C'"),
        {"cells.h5ad": _h5ad_with_value(-np.inf, sparse=False)},
    ),
    Case(
        "normalize_total_negative_values",
        "data: {name: csv, params: {path: expr.csv, values: normalized}}\n"
        "preprocess: [{name: normalize_total}]\nextractors: [{name: pearson}]",
        ("preprocessor 'normalize_total'", "1 negative value", "-0.5, for cell 'c2' and gene 'g3'", "scale"),
        {"expr.csv": ",c1,c2,c3\ng1,1,2,3\ng2,0,1,4\ng3,2,-0.5,1\n"},
    ),
    Case(
        "log1p_below_minus_one",
        "data: {name: csv, params: {path: expr.csv, values: normalized}}\n"
        "preprocess: [{name: log1p}]\nextractors: [{name: pearson}]",
        ("preprocessor 'log1p'", "2 values at or below -1", "-1, for cell 'c1' and gene 'g2'", "-inf or NaN"),
        {"expr.csv": ",c1,c2,c3\ng1,1,2,3\ng2,-1,1,4\ng3,2,-3,1\n"},
    ),
    Case(
        "pearson_identical_groups",
        "data: {name: csv, params: {path: expr.csv, metadata: meta.csv}}\n"
        "extractors: [{name: pearson, params: {group_key: group, case: a, control: b}}]",
        ("is 0 for every pair", "same correlations", "name different cells"),
        {"expr.csv": TWIN_GROUPS, "meta.csv": TWIN_GROUPS_META},
    ),
    Case(
        "learning_rate_inf",
        "data: {name: synthetic, params: {n_cells: 60, n_genes: 8, n_regulators: 2, n_donors: 2, "
        "n_rewired: 0, n_gained: 0}, "
        "label_key: disease}\nmodel: {name: mlp, params: {hidden_sizes: [4]}}\n"
        "train: {epochs: 1, learning_rate: .inf, device: cpu}",
        ("train.learning_rate", "finite"),
    ),
    Case(
        "nes_stability_without_sampler",
        f"{KRUMSIEK}\nextractors: [{{name: pearson}}]\n"
        "evaluators: [{name: nes_stability, params: {permutations: 10, plot: false}}]",
        ("evaluators.0", "'nes_stability' compares repeated samples", "has no sampler", "repeats"),
    ),
]
