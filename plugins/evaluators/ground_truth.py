"""Ground-truth networks for interaction evaluators: the shared ``ground_truth`` parameter and builders.

``{source: data}`` takes the network the data source ships (``context.ground_truth``, e.g. the
krumsiek11 model); ``{source: data, edges: <name>}`` one of the named networks a source ships beside
it (``context.ground_truths``, from ``DataSource.ground_truths()``): the ``synthetic`` source names
``planted`` (the control network), ``disease`` (the edges the disease flips or adds) and ``state``
(the rare state's edges), so one run can score a disease-minus-control extractor against the disease
edges and an all-cells extractor against the planted network. ``{source: file, path, format}``
builds one from an edge table:

===========  =====================================================  ========  ======
format       columns read                                           directed  sign
===========  =====================================================  ========  ======
biogrid      entrezID_A, entrezID_B, symbol_A, symbol_B (EGAD)      no        no
trrust       TF, gene_symbol (or the 4 headerless columns), mode    yes       Activation/Repression
dorothea     tf, confidence, target, mor                            yes       sign of mor
beeline      Gene1, Gene2[, Type +/-][, Score]                      yes       Type
string       Gene1, Gene2[, Score] or protein1, protein2, score     no        no
regnetwork   TF, TF_entrez, target, target_entrez, --> / --|        yes       arrow
edges        source_column, target_column[, sign_column, score]     param     param
===========  =====================================================  ========  ======

Files are read by their content: gzip, bz2, xz or zip whatever the name, and a tab- or
comma-separated header whatever the suffix. A file that does not look like its ``format`` (a
DoRothEA table read as TRRUST, a header-less file without TRRUST's modes) is refused, saying what
the file looks like, before any gene is matched; so is an empty file or one without edges.

BEELINE's STRING lists hold each edge twice (A,B and B,A): as undirected pairs they collapse to one.
An optional ``disease_genes`` filter keeps edges whose two genes are both disease genes (the WDS
paper's "BioGRID pairs of DisGeNET Alzheimer's genes", Wu et al., NeurIPS 2024); genes are matched by
Entrez ID or by symbol (``match_on``). Edges are then expressed in the run's gene namespace
(``gene_ids``: symbol, entrez or Ensembl), through the file's own columns or a GENCODE table.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from grnx_core import DataError, GroundTruth, RunContext
from grnx_core.data_types import pair_ids
from grnx_plugins.data._common import UNREADABLE, compression_of, first_lines

Namespace = Literal["symbol", "entrez", "ensembl"]

_FORMAT_DIRECTED = {
    "biogrid": False,
    "trrust": True,
    "dorothea": True,
    "beeline": True,
    "string": False,
    "regnetwork": True,
    "edges": True,
}
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

#: Header columns that identify a format; the first match names what a file looks like.
_HEADERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("biogrid", frozenset({"entrezID_A", "entrezID_B", "symbol_A", "symbol_B"})),
    ("dorothea", frozenset({"tf", "target", "mor"})),
    ("trrust", frozenset({"TF", "gene_symbol"})),
    ("string", frozenset({"protein1", "protein2"})),
    ("beeline", frozenset({"Gene1", "Gene2"})),
)
#: TRRUST's mode of regulation (third column) and RegNetwork's arrows (fifth column).
_TRRUST_MODES = frozenset({"activation", "repression", "unknown"})
_REGNETWORK_ARROWS = frozenset({"-->", "--|", "-/-", "-p", "->", "-|"})
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zip")


class DiseaseGenes(BaseModel):
    """A disease gene list: keep only ground-truth edges whose two genes are both on it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="file of disease genes (relative paths resolve from the current directory)")
    format: Literal["disgenet", "list", "table"] = Field(
        "disgenet",
        description="disgenet: DisGeNET gene-disease table (Gene, Gene_id, Score_gda); list: one gene per "
        "line ('#' comments); table: a tab-separated table, genes in 'column'",
    )
    min_score: float | None = Field(
        None, description="DisGeNET only: keep genes with Score_gda >= min_score (the WDS paper: 0.1, 0.3)"
    )
    column: str | None = Field(None, description="table format: the column holding the gene ids")


class EdgeSplit(BaseModel):
    """A seeded part of the ground truth's pairs: tune against one part, report on the other.

    The distinct pairs (an undirected A-B and B-A are one pair) are sorted and shuffled with ``seed``;
    the first ``round(fraction * n)`` form the ``tune`` part and the rest the ``report`` part, so the
    two parts of one split are disjoint and together make the whole ground truth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    part: Literal["tune", "report"] = Field(description="which part of the pairs to keep")
    fraction: float = Field(0.5, gt=0, lt=1, description="share of the pairs in the tune part")
    seed: int = Field(0, ge=0, description="seed of the shuffle that splits the pairs")


class GroundTruthSpec(BaseModel):
    """Where an evaluator's reference network comes from and how its genes are matched."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["data", "file"] = Field(
        "data", description="data: the network the data source ships (e.g. krumsiek11); file: an edge table"
    )
    edges: str | None = Field(
        None,
        description="source: data only: which of the data source's named networks, e.g. synthetic's "
        "planted, disease or state; None: the one it ships as its ground truth (ground_truth_edges)",
    )
    path: str | None = Field(None, description="edge table (source: file); relative to the current directory")
    format: Literal["biogrid", "trrust", "dorothea", "beeline", "string", "regnetwork", "edges"] | None = (
        Field(None, description="layout of the edge table (see the module docstring)")
    )
    directed: bool | None = Field(None, description="override whether edges are directed; None: the format's")
    min_score: float | None = Field(
        None, description="keep edges whose score column (STRING combined_score, BEELINE Score) >= min_score"
    )
    confidence: tuple[str, ...] | None = Field(
        None, description="DoRothEA confidence levels to keep, e.g. [A, B]; None keeps all"
    )
    source_column: str | None = Field(None, description="edges format: column of the regulator / first gene")
    target_column: str | None = Field(None, description="edges format: column of the target / second gene")
    sign_column: str | None = Field(None, description="edges format: column of the edge sign (+/-, 1/-1)")
    score_column: str | None = Field(None, description="edges format: column compared with min_score")
    disease_genes: DiseaseGenes | None = Field(None, description="keep edges between disease genes only")
    match_on: Literal["symbol", "entrez"] = Field(
        "symbol", description="gene ids used to match edges with the disease gene list"
    )
    gene_ids: Namespace = Field(
        "symbol", description="namespace of the run's gene names (adata.var_names) the edges are mapped to"
    )
    gencode: str | None = Field(
        None,
        description="GENCODE table (ensemblID, name, entrezID) for symbol/Entrez/Ensembl conversion, e.g. "
        "../shared/data/ground_truth/gencode_human_ensembl_symbol_entrez.tsv",
    )
    case_sensitive: bool = Field(
        True, description="False: match gene names ignoring case (e.g. mouse genes against upper-case lists)"
    )
    name: str | None = Field(None, description="name of the ground truth in logs; defaults to the file name")
    edge_split: EdgeSplit | None = Field(
        None,
        description="keep a seeded part of the pairs (a tune's ground_truth_split sets it: trials are scored "
        "on part tune, the best trial is reported on part report); None keeps every pair",
    )

    @model_validator(mode="after")
    def _edges_from_the_data(self) -> GroundTruthSpec:
        if self.edges is not None and self.source != "data":
            raise ValueError(
                f"edges: {self.edges!r} names one of the data source's networks, so it needs source: data "
                f"(found source: {self.source}); remove edges, or set source: data"
            )
        return self

    def input_files(self) -> list[Path]:
        """The files this spec reads (checked before a run starts; their content keys the cache)."""
        if self.source != "file":
            return []
        named = [self.path, self.disease_genes.path if self.disease_genes else None, self.gencode]
        return [Path(name).expanduser() for name in named if name]


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def resolve_ground_truth(spec: GroundTruthSpec, context: RunContext, who: str) -> GroundTruth:
    """The ground truth ``spec`` describes, for the evaluator named ``who`` (one part of it with
    ``edge_split``)."""
    truth = _resolve_whole(spec, context, who)
    return split_edges(truth, spec.edge_split, who) if spec.edge_split is not None else truth


def split_edges(truth: GroundTruth, split: EdgeSplit, who: str = "ground_truth") -> GroundTruth:
    """The ``split.part`` part of ``truth``'s pairs (see :class:`EdgeSplit`)."""
    pairs = pair_ids(truth.edges["source"], truth.edges["target"], truth.directed)
    distinct = np.unique(pairs)
    n_tune = int(round(split.fraction * len(distinct)))
    if n_tune == 0 or n_tune == len(distinct):
        raise DataError(
            f"{who}: ground_truth.edge_split fraction {split.fraction:g} of {len(distinct)} pairs leaves "
            f"{'no' if n_tune == 0 else 'every'} pair in the tune part, so one part is empty. Use a fraction "
            "nearer 0.5, or a ground truth with more pairs."
        )
    tune_part = distinct[np.random.default_rng(split.seed).permutation(len(distinct))[:n_tune]]
    in_tune = np.isin(pairs, tune_part)
    keep = in_tune if split.part == "tune" else ~in_tune
    share = split.fraction if split.part == "tune" else 1 - split.fraction
    return GroundTruth(
        edges=truth.edges[keep].reset_index(drop=True),
        directed=truth.directed,
        name=f"{truth.name} ({split.part} part: {share:.0%} of pairs, seed {split.seed})",
    )


def _resolve_whole(spec: GroundTruthSpec, context: RunContext, who: str) -> GroundTruth:
    if spec.source == "data" and spec.edges is not None:
        return named_data_truth(spec.edges, context, who)
    if spec.source == "data":
        if context.ground_truth is None:
            raise DataError(
                f"{who}: ground_truth.source is 'data', but the data source ships no ground truth. "
                "Use {source: file, path: ..., format: ...} (e.g. ../shared/data/ground_truth/"
                "biogrid_3.4.126_human_pairs.tsv with format: biogrid)."
            )
        return context.ground_truth
    return build_ground_truth(spec, who)


def named_data_truth(name: str, context: RunContext, who: str) -> GroundTruth:
    """The data source's network called ``name`` (``context.ground_truths``, filled from
    ``DataSource.ground_truths()``), or a clear error listing the names it has."""
    named = context.ground_truths
    if name in named:
        return named[name]
    if not named:
        raise DataError(
            f"{who}: ground_truth.edges is {name!r}, but the data source ships no named networks "
            f"({'only one unnamed ground truth' if context.ground_truth is not None else 'no ground truth'}). "
            "Remove edges to score against the data's ground truth, or use a source that names its "
            "networks (synthetic: planted, disease, state)."
        )
    raise DataError(
        f"{who}: ground_truth.edges is {name!r}, but the data source's networks are {sorted(named)}. "
        f"Set edges to one of them (the synthetic source has 'state' only with rare_state_fraction > 0 "
        "and n_state_edges > 0)."
    )


def build_ground_truth(spec: GroundTruthSpec, who: str = "ground_truth") -> GroundTruth:
    if spec.path is None or spec.format is None:
        raise DataError(f"{who}: ground_truth.source 'file' needs both 'path' and 'format'.")
    files = [spec.path] + ([spec.disease_genes.path] if spec.disease_genes else []) + [spec.gencode]
    stamps = tuple(Path(f).stat().st_mtime_ns if f and Path(f).is_file() else None for f in files)
    return _build_cached(spec, who, stamps)


@functools.lru_cache(maxsize=8)
def _build_cached(spec: GroundTruthSpec, who: str, stamps: tuple) -> GroundTruth:
    """Built once per spec and file versions (``stamps``): evaluators of one run share the result."""
    path = _existing(spec.path, f"{who}: ground_truth.path")
    edges = _read_edges(spec, path, who)
    if edges.empty:
        raise DataError(
            f"{who}: {path} lists no edges (a header line only). Point ground_truth.path at the full edge table."
        )
    if spec.min_score is not None:
        if "score" not in edges.columns:
            raise DataError(
                f"{who}: ground_truth.min_score is set but {path.name} has no score column "
                f"(format {spec.format!r}). Remove min_score or set score_column."
            )
        edges = edges[edges["score"].astype(float) >= spec.min_score]
    if spec.disease_genes is not None:
        edges = _filter_disease(edges, spec, who)
    edges = _to_namespace(edges, spec, who)
    directed = spec.directed if spec.directed is not None else _FORMAT_DIRECTED[spec.format]
    keep = ["source", "target"] + (["sign"] if "sign" in edges.columns else [])
    edges = edges[keep].dropna(subset=["source", "target"]).astype({"source": str, "target": str})
    if edges.empty:
        raise DataError(f"{who}: the ground truth built from {path} has no edges left after filtering.")
    if "sign" in edges.columns:
        # TRRUST and others list some pairs as both activation and repression: their sign is unknown.
        pair = pair_ids(edges["source"], edges["target"], directed)
        conflicting = pd.Series(edges["sign"].to_numpy()).groupby(pair).transform("nunique").to_numpy() > 1
        edges = edges.assign(sign=np.where(conflicting, 0, edges["sign"]).astype(np.int8))
    return GroundTruth(
        edges=edges.reset_index(drop=True), directed=directed, name=spec.name or _default_name(spec)
    )


def _default_name(spec: GroundTruthSpec) -> str:
    name = Path(spec.path).stem
    disease = spec.disease_genes
    if disease is not None:
        name += f" x {Path(disease.path).stem}"
        if disease.min_score is not None:
            name += f" (score >= {disease.min_score:g})"
    return name


def _existing(path: str, where: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise DataError(
            f"{where}: file {path!r} not found (resolved to {resolved.resolve()}); relative paths resolve "
            "from the current directory (the repository root when you run grnx there)."
        )
    return resolved


def _read_table(
    path: Path, sep: str | None = None, who: str = "ground_truth", what: str = "an edge table", **kwargs
) -> pd.DataFrame:
    """A table of text fields, compressed or not whatever its name. ``sep=None``: tab, or comma for
    ``.csv`` files, unless the first line holds only the other one."""
    if sep is None:
        sep = _delimiter(path)
    try:
        return pd.read_csv(
            path,
            sep=sep,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            compression=compression_of(path),
            **kwargs,
        )
    except pd.errors.EmptyDataError as error:
        unpacked = " after decompressing" if compression_of(path) else ""
        raise DataError(
            f"{who}: {path} is empty (no lines{unpacked}), where {what} was expected. Point the path "
            "at the file that holds it (download it again if it was cut short)."
        ) from error
    except Exception as error:  # pandas raises many types; the user needs the file name
        description, _ = _looks_like(path)
        detail = "" if description.startswith("it cannot be read") else f" ({description})"
        raise DataError(
            f"{who}: could not read {path} as {what}: {type(error).__name__}: {error}{detail}. Check "
            "that the file is complete (download it again if need be) and is the table the path should name."
        ) from error


def _delimiter(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in _COMPRESSION_SUFFIXES]
    preferred, other = (",", "\t") if suffixes and suffixes[-1] == ".csv" else ("\t", ",")
    try:
        lines = first_lines(path, 20)
    except UNREADABLE:  # reading the table says what is wrong with the file
        return preferred
    line = next((line for line in lines if line.strip() and not line.startswith("#")), "")
    return other if preferred not in line and other in line else preferred


def _looks_like(path: Path) -> tuple[str, str | None]:
    """How the file's first line reads ("its first line has 4 tab-separated fields [...]") and the
    format it resembles, if any."""
    try:
        lines = [line for line in first_lines(path, 20) if line.strip()]
    except UNREADABLE as error:
        return f"it cannot be read as text ({type(error).__name__}: {error})", None
    content = [line for line in lines if not line.startswith("#")]
    if not content:
        return "it holds no lines" + (" besides comments" if lines else ""), None
    line = content[0]
    if "\t" in line:
        fields, layout = line.split("\t"), "tab-separated"
    elif "," in line:
        fields, layout = line.split(","), "comma-separated"
    else:
        fields, layout = line.split(), "space-separated"
    fields = [field.strip().strip('"') for field in fields]
    guess = next((fmt for fmt, columns in _HEADERS if columns <= set(fields)), None)
    if guess is None and len(fields) == 4 and fields[2].lower() in _TRRUST_MODES:
        guess = "trrust"
    elif guess is None and len(fields) == 5 and fields[4] in _REGNETWORK_ARROWS:
        guess = "regnetwork"
    shown = fields[:8] + (["..."] if len(fields) > 8 else [])
    if len(fields) == 1:
        return f"its first line is a single field {shown}", guess
    return f"its first line has {len(fields)} {layout} fields {shown}", guess


def _unlike(path: Path, fmt: str, who: str, problem: str) -> DataError:
    """The file does not look like ``fmt``: say what it looks like and which format fits it."""
    description, guess = _looks_like(path)
    if fmt not in _FORMAT_DIRECTED:  # a disease gene list or a GENCODE table, not an edge table
        advice = f"It looks like a {guess!r} edge table; " if guess else ""
        advice += "check that the path names the right file."
    elif guess is not None and guess != fmt:
        advice = f"That is the layout of format {guess!r}: set ground_truth.format: {guess}."
    else:
        advice = (
            "Pick the format that matches the file (the table in `grnx plugins evaluator auprc`), or "
            "use format: edges with source_column and target_column."
        )
    return DataError(
        f"{who}: {path.name} does not look like a {fmt!r} table: {problem}; {description}. {advice}"
    )


def _need(table: pd.DataFrame, columns: list[str], path: Path, fmt: str, who: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise _unlike(
            path,
            fmt,
            who,
            f"read as format {fmt!r} it needs columns {columns}; missing {missing}, found "
            f"{list(table.columns)[:12]}",
        )


def _check_vocabulary(
    values: pd.Series, allowed: frozenset[str], path: Path, fmt: str, who: str, column: str
) -> None:
    """Refuse a column whose values are not ``fmt``'s words (``allowed``, compared in lower case)."""
    text = values.fillna("<missing>").astype(str).str.strip()
    unknown = text[~text.str.lower().isin({a.lower() for a in allowed})]
    if len(unknown):
        raise _unlike(
            path,
            fmt,
            who,
            f"{len(unknown)} of {len(text)} rows have no {column} among {sorted(allowed)} (e.g. "
            f"{list(dict.fromkeys(unknown))[:4]})",
        )


def _sign_from(values: pd.Series) -> pd.Series:
    text = values.astype(str).str.strip().str.lower()
    mapping = {
        "+": 1,
        "-": -1,
        "activation": 1,
        "repression": -1,
        "-->": 1,
        "--|": -1,
        "1": 1,
        "-1": -1,
        "1.0": 1,
        "-1.0": -1,
        "activator": 1,
        "repressor": -1,
    }
    signs = text.map(mapping)
    numeric = pd.to_numeric(values, errors="coerce")
    signs = signs.fillna(np.sign(numeric))
    return signs.fillna(0).astype(np.int8)


def _read_edges(spec: GroundTruthSpec, path: Path, who: str) -> pd.DataFrame:
    fmt = spec.format
    if fmt == "biogrid":
        table = _read_table(path, who=who)
        _need(table, ["entrezID_A", "entrezID_B", "symbol_A", "symbol_B"], path, fmt, who)
        return pd.DataFrame(
            {
                "source": table["symbol_A"],
                "target": table["symbol_B"],
                "source_entrez": table["entrezID_A"],
                "target_entrez": table["entrezID_B"],
            }
        )
    if fmt == "trrust":
        table = _read_table(path, who=who)
        if "TF" not in table.columns:  # the raw TRRUST download has no header
            if len(table.columns) != 4:
                raise _unlike(
                    path,
                    fmt,
                    who,
                    f"it has no 'TF' column and {len(table.columns)} columns, where a header-less TRRUST "
                    "file has 4 (TF, target, mode, PubMed ids)",
                )
            table = _read_table(
                path, who=who, header=None, names=["TF", "gene_symbol", "interaction", "position"]
            )
        _need(table, ["TF", "gene_symbol", "interaction"], path, fmt, who)
        _check_vocabulary(table["interaction"], _TRRUST_MODES, path, fmt, who, "mode of regulation")
        return pd.DataFrame(
            {"source": table["TF"], "target": table["gene_symbol"], "sign": _sign_from(table["interaction"])}
        )
    if fmt == "dorothea":
        table = _read_table(path, who=who)
        _need(table, ["tf", "target", "mor", "confidence"], path, fmt, who)
        if spec.confidence is not None:
            table = table[table["confidence"].isin(spec.confidence)]
        return pd.DataFrame(
            {"source": table["tf"], "target": table["target"], "sign": _sign_from(table["mor"])}
        )
    if fmt in ("beeline", "string"):
        comma = _delimiter(path) == ","
        table = _read_table(path, sep=None if fmt == "beeline" or comma else r"\s+", who=who)
        if fmt == "string" and {"protein1", "protein2"} <= set(table.columns):
            score = "combined_score" if "combined_score" in table.columns else None
            edges = pd.DataFrame({"source": table["protein1"], "target": table["protein2"]})
            if score:
                edges["score"] = pd.to_numeric(table[score])
            return edges
        _need(table, ["Gene1", "Gene2"], path, fmt, who)
        edges = pd.DataFrame({"source": table["Gene1"], "target": table["Gene2"]})
        if "Type" in table.columns:
            edges["sign"] = _sign_from(table["Type"])
        if "Score" in table.columns:
            edges["score"] = pd.to_numeric(table["Score"], errors="coerce")
        return edges
    if fmt == "regnetwork":
        table = _read_table(
            path,
            sep=r"\s+",
            who=who,
            header=None,
            comment="#",
            names=["TF", "TF_entrez", "target", "target_entrez", "direction"],
        )
        _check_vocabulary(table["direction"], _REGNETWORK_ARROWS, path, fmt, who, "arrow (5th field)")
        return pd.DataFrame(
            {
                "source": table["TF"],
                "target": table["target"],
                "source_entrez": table["TF_entrez"],
                "target_entrez": table["target_entrez"],
                "sign": _sign_from(table["direction"]),
            }
        )
    # generic edge table
    if spec.source_column is None or spec.target_column is None:
        raise DataError(f"{who}: format 'edges' needs ground_truth.source_column and target_column.")
    table = _read_table(path, who=who)
    columns = [spec.source_column, spec.target_column]
    columns += [c for c in (spec.sign_column, spec.score_column) if c is not None]
    _need(table, columns, path, fmt, who)
    edges = pd.DataFrame({"source": table[spec.source_column], "target": table[spec.target_column]})
    if spec.sign_column is not None:
        edges["sign"] = _sign_from(table[spec.sign_column])
    if spec.score_column is not None:
        edges["score"] = pd.to_numeric(table[spec.score_column], errors="coerce")
    return edges


def read_disease_genes(disease: DiseaseGenes, match_on: str, who: str) -> set[str]:
    """The disease gene ids, as strings in the ``match_on`` namespace of the file."""
    path = _existing(disease.path, f"{who}: ground_truth.disease_genes.path")
    if disease.format == "disgenet":
        table = _read_table(path, who=who, what="a DisGeNET table")
        _need(table, ["Gene", "Gene_id", "Score_gda"], path, "disgenet", who)
        if disease.min_score is not None:
            table = table[pd.to_numeric(table["Score_gda"]) >= disease.min_score]
        column = "Gene_id" if match_on == "entrez" else "Gene"
        return set(table[column].dropna().astype(str).str.strip())
    if disease.min_score is not None:
        raise DataError(f"{who}: disease_genes.min_score applies to DisGeNET tables only.")
    if disease.format == "table":
        table = _read_table(path, who=who, what="a disease gene table")
        if disease.column is None:
            raise DataError(
                f"{who}: disease_genes format 'table' needs 'column' (found {list(table.columns)})."
            )
        _need(table, [disease.column], path, "table", who)
        return set(table[disease.column].dropna().astype(str).str.strip())
    genes = {line.strip() for line in first_lines(path, None) if line.strip() and not line.startswith("#")}
    if not genes:
        raise DataError(f"{who}: the disease gene list {path} holds no genes (one per line expected).")
    return genes


def _filter_disease(edges: pd.DataFrame, spec: GroundTruthSpec, who: str) -> pd.DataFrame:
    genes = read_disease_genes(spec.disease_genes, spec.match_on, who)
    if spec.match_on == "entrez":
        if "source_entrez" not in edges.columns:
            converted = _gencode_map(spec, "symbol", "entrez", who)
            edges = edges.assign(
                source_entrez=edges["source"].map(converted), target_entrez=edges["target"].map(converted)
            )
        a, b = edges["source_entrez"].astype(str), edges["target_entrez"].astype(str)
    else:
        a, b = edges["source"].astype(str), edges["target"].astype(str)
    kept = edges[a.isin(genes) & b.isin(genes)]
    if kept.empty:
        raise DataError(
            f"{who}: no ground-truth edge joins two disease genes ({len(genes)} genes matched on "
            f"{spec.match_on}; e.g. {sorted(genes)[:5]}). Check match_on and the disease gene file."
        )
    return kept


def _to_namespace(edges: pd.DataFrame, spec: GroundTruthSpec, who: str) -> pd.DataFrame:
    if spec.gene_ids == "symbol":
        return edges
    if spec.gene_ids == "entrez" and "source_entrez" in edges.columns:
        return edges.assign(source=edges["source_entrez"], target=edges["target_entrez"])
    if "source_entrez" in edges.columns:
        mapping = _gencode_map(spec, "entrez", spec.gene_ids, who)
        source, target = edges["source_entrez"].astype(str), edges["target_entrez"].astype(str)
    else:
        mapping = _gencode_map(spec, "symbol", spec.gene_ids, who)
        source, target = edges["source"].astype(str), edges["target"].astype(str)
    return edges.assign(source=source.map(mapping), target=target.map(mapping))


def _gencode_map(spec: GroundTruthSpec, from_ns: str, to_ns: str, who: str) -> dict[str, str]:
    if spec.gencode is None:
        raise DataError(
            f"{who}: mapping ground-truth genes from {from_ns} to {to_ns} needs a GENCODE table: set "
            "ground_truth.gencode (e.g. ../shared/data/ground_truth/gencode_human_ensembl_symbol_entrez.tsv)."
        )
    return gencode_mapping(spec.gencode, from_ns, to_ns)


@functools.lru_cache(maxsize=8)
def gencode_mapping(path: str, from_ns: str, to_ns: str) -> dict[str, str]:
    """id -> id from a GENCODE table (columns ensemblID, name, entrezID); the first row wins."""
    file = _existing(path, "ground_truth.gencode")
    table = _read_table(file, who="ground_truth.gencode", what="a GENCODE table")
    _need(table, ["ensemblID", "name", "entrezID"], file, "gencode", "ground_truth.gencode")
    column = {"symbol": "name", "entrez": "entrezID", "ensembl": "ensemblID"}
    pairs = table[[column[from_ns], column[to_ns]]].dropna()
    pairs = pairs[(pairs.iloc[:, 0] != "NA") & (pairs.iloc[:, 1] != "NA")]
    if to_ns == "ensembl" or from_ns == "ensembl":
        pairs = pairs.apply(lambda col: col.str.replace(r"\.\d+$", "", regex=True))
    pairs = pairs.drop_duplicates(subset=pairs.columns[0], keep="first")
    return dict(zip(pairs.iloc[:, 0], pairs.iloc[:, 1]))


# ---------------------------------------------------------------------------------------------
# Matching against a run's gene universe
# ---------------------------------------------------------------------------------------------


def normalise_gene(name: str, case_sensitive: bool = True) -> str:
    """Matching key: Ensembl version suffixes dropped; upper case unless case-sensitive."""
    if _ENSEMBL.match(name):
        name = name.split(".", 1)[0]
    return name if case_sensitive else name.upper()


def _overlaps_ignoring_case(truth: GroundTruth, universe: list[str]) -> bool:
    """Whether some ground-truth pair lies in the universe once names are compared in upper case."""
    genes = {normalise_gene(g, case_sensitive=False) for g in universe}
    source = truth.edges["source"].astype(str).map(lambda g: normalise_gene(g, case_sensitive=False))
    target = truth.edges["target"].astype(str).map(lambda g: normalise_gene(g, case_sensitive=False))
    return bool((source.isin(genes) & target.isin(genes) & (source != target)).any())


def overlap_error(who: str, truth: GroundTruth, universe: list[str], extractor: str) -> DataError:
    """A clear error for a ground truth sharing no pair with the run's genes."""
    truth_genes = sorted(truth.genes)
    hint = ""
    n_ensembl = sum(bool(_ENSEMBL.match(g)) for g in universe[:200])
    gt_ensembl = sum(bool(_ENSEMBL.match(g)) for g in truth_genes[:200])
    if n_ensembl and not gt_ensembl:
        hint = " The run's genes look like Ensembl IDs: set ground_truth.gene_ids: ensembl and ground_truth.gencode."
    elif universe and all(g.isdigit() for g in universe[:50]):
        hint = " The run's genes look like Entrez IDs: set ground_truth.gene_ids: entrez."
    elif _overlaps_ignoring_case(truth, universe):
        hint = " They share pairs when letter case is ignored: set ground_truth.case_sensitive: false."
    return DataError(
        f"{who}: no pair of ground truth {truth.name!r} ({len(truth.edges)} edges over {len(truth_genes)} "
        f"genes, e.g. {truth_genes[:4]}) falls inside the {len(universe)} genes scored by extractor "
        f"{extractor!r} (e.g. {list(universe[:4])}).{hint}"
    )
