"""Behavioural contract checks for grnx components, run on tiny synthetic data.

The grnx counterpart of scikit-learn's ``check_estimator``: :func:`check_component` runs a component
class on fixtures built here (an AnnData of integer counts, 60 cells x 30 genes, with label, donor,
batch, cell type and split columns, as scipy CSR and as dense numpy) and checks what its kind
promises. The checks by kind (:data:`KIND_CHECKS`):

- ``returns_type``: the kind's method returns the kind's type, with consistent content (a data
  source's ``load`` an AnnData whose declared counts are integers; a sampler a valid
  :class:`CellSample`; a tokenizer :class:`TokenizedCells` carrying the asked obs columns; a model
  predictions and embeddings for every cell; an extractor ranked :class:`Interactions` over
  ``var_names``; an evaluator an :class:`EvaluationResult` whose every metric is declared, with a
  direction in ``higher_is_better`` or in ``informational``).
- ``counts_declared`` (data sources): ``uns["grnx_data"]["counts"]`` says where the raw counts are
  (``layers/counts``, ``X`` or ``none``) and that place holds non-negative integers.
- ``writes_declared`` (preprocessors): only the keys listed in ``writes`` are added, removed or
  changed (removing cells or genes is allowed; undeclared keys keep their values on what is kept).
- ``same_seed``: two runs with the same parameters and seed give the same output.
- ``sparse_dense``: CSR and dense inputs give the same output.
- ``save_load``: outputs and fitted components survive ``save``/``load`` (CellSample,
  TokenizedCells, Interactions, tokenizers, models).
- ``backed`` (samplers): a backed AnnData gives the same sample as the in-memory one.
- ``streamed`` (tokenizers whose ``transform`` takes ``path``): streaming to a folder gives the
  same tokens as the in-memory call.
- ``aggregate`` (evaluators defining it): every metric of the aggregate over repeats is declared.

A component needing parameters or earlier stages gets them from a :class:`Case`; a check that
cannot run on the fixtures raises :class:`SkipComponent` with the reason. A failed check raises
``AssertionError`` naming the component, the check and what was found. Nothing here imports torch
or pytest at import time; :func:`pytest_params` imports pytest when called.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import scipy.sparse as sp

from grnx_core.components import (
    Component,
    DataSource,
    Evaluator,
    Extractor,
    Kind,
    Model,
    Preprocessor,
    Sampler,
    Tokenizer,
)
from grnx_core.context import DataRoles, RunContext
from grnx_core.data_types import CellSample, EvaluationResult, GroundTruth, Interactions, TokenizedCells

if TYPE_CHECKING:
    import anndata

    from grnx_core.registry import ComponentEntry, Registry

__all__ = [
    "KIND_CHECKS",
    "OBS_COLUMNS",
    "ROLES",
    "Case",
    "CheckItem",
    "ComponentChecker",
    "FixtureFiles",
    "SkipComponent",
    "check_component",
    "check_data_source",
    "check_evaluator",
    "check_extractor",
    "check_model",
    "check_preprocessor",
    "check_registry",
    "check_sampler",
    "check_tokenizer",
    "compare_adata",
    "compare_interactions",
    "compare_samples",
    "compare_tokens",
    "compare_values",
    "declared_writes",
    "make_adata",
    "make_context",
    "make_ground_truth",
    "make_interactions",
    "pytest_params",
    "write_fixture_files",
    "written_keys",
]


class SkipComponent(Exception):
    """A check that cannot run on the tiny fixtures; the message says why."""


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

#: obs columns of the fixture AnnData (tokenizers are asked to carry all of them).
OBS_COLUMNS = ("label", "donor", "batch", "cell_type", "split")

#: The data roles of the fixture's obs columns.
ROLES = DataRoles(label_key="label", donor_key="donor", batch_key="batch", cell_type_key="cell_type")

#: Gene symbols and Ensembl ids of the fixture (human genes found in Geneformer's V1 and V2
#: token and median dictionaries; two mitochondrial and two ribosomal genes for QC).
GENES: tuple[tuple[str, str], ...] = (
    ("MT-CO1", "ENSG00000198804"),
    ("MT-ND1", "ENSG00000198888"),
    ("RPL3", "ENSG00000100316"),
    ("RPS6", "ENSG00000137154"),
    ("CD3E", "ENSG00000198851"),
    ("CD3D", "ENSG00000167286"),
    ("IL7R", "ENSG00000168685"),
    ("CCR7", "ENSG00000126353"),
    ("CD4", "ENSG00000010610"),
    ("CD8A", "ENSG00000153563"),
    ("S100A8", "ENSG00000143546"),
    ("S100A9", "ENSG00000163220"),
    ("LYZ", "ENSG00000090382"),
    ("CD14", "ENSG00000170458"),
    ("CD19", "ENSG00000177455"),
    ("MS4A1", "ENSG00000156738"),
    ("CD79A", "ENSG00000105369"),
    ("NKG7", "ENSG00000105374"),
    ("GNLY", "ENSG00000115523"),
    ("FCGR3A", "ENSG00000203747"),
    ("ACTB", "ENSG00000075624"),
    ("GAPDH", "ENSG00000111640"),
    ("B2M", "ENSG00000166710"),
    ("HLA-DRA", "ENSG00000204287"),
    ("PPBP", "ENSG00000163736"),
    ("FTL", "ENSG00000087086"),
    ("FTH1", "ENSG00000167996"),
    ("TMSB4X", "ENSG00000205542"),
    ("EEF1A1", "ENSG00000156508"),
    ("TPT1", "ENSG00000133112"),
)

N_CELLS = 60
N_DONORS = 6
#: Genes driven by one shared program in every cell, and genes co-regulated in case cells only.
_PROGRAM = ("CD3E", "CD3D", "IL7R", "CCR7", "CD4", "CD8A")
_CASE_PROGRAM = ("S100A8", "S100A9", "LYZ", "CD14")
_CELL_TYPE_MARKERS = {"T": ("CD3E", "CD3D", "IL7R"), "B": ("CD19", "MS4A1", "CD79A"), "NK": ("NKG7", "GNLY")}


def _fixture_counts(seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Integer counts (cells x genes) and obs of the fixture; the same for a given seed."""
    rng = np.random.default_rng(seed)
    symbols = [symbol for symbol, _ in GENES]
    donors = np.repeat([f"donor{i}" for i in range(N_DONORS)], N_CELLS // N_DONORS)
    donor_number = np.repeat(np.arange(N_DONORS), N_CELLS // N_DONORS)
    is_case = donor_number < N_DONORS // 2
    batch = np.where(np.isin(donor_number, [0, 1, 3]), "batch0", "batch1")
    cell_type = np.array(["T", "B", "NK"])[np.arange(N_CELLS) % 3]
    split = np.where(np.isin(donor_number, [2, 5]), "test", "train")

    log_mean = np.log(rng.uniform(1.0, 8.0, len(symbols)))[None, :].repeat(N_CELLS, axis=0)
    program = rng.standard_normal(N_CELLS)
    case_program = rng.standard_normal(N_CELLS)
    for symbol in _PROGRAM:
        log_mean[:, symbols.index(symbol)] += 0.9 * program
    for symbol in _CASE_PROGRAM:
        log_mean[is_case, symbols.index(symbol)] += 0.9 * case_program[is_case]
    for kind, markers in _CELL_TYPE_MARKERS.items():
        for symbol in markers:
            log_mean[cell_type == kind, symbols.index(symbol)] += 1.0
    log_mean += rng.normal(0.0, 0.3, N_CELLS)[:, None]  # sequencing depth
    mean = np.exp(log_mean)
    counts = rng.poisson(rng.gamma(5.0, mean / 5.0)).astype(np.int64)
    obs = pd.DataFrame(
        {
            "label": pd.Categorical(np.where(is_case, "case", "control")),
            "donor": pd.Categorical(donors),
            "batch": pd.Categorical(batch),
            "cell_type": pd.Categorical(cell_type),
            "split": pd.Categorical(split, categories=["train", "test"]),
            "n_counts": counts.sum(axis=1).astype(np.float64),
        },
        index=pd.Index([f"cell{i:02d}" for i in range(N_CELLS)]),
    )
    return counts, obs


def make_adata(*, sparse: bool = True, seed: int = 0) -> anndata.AnnData:
    """The fixture: 60 cells x 30 genes of integer counts in ``X`` (float32) and ``layers["counts"]``.

    obs: ``label`` (case/control, one per donor), ``donor`` (6), ``batch`` (2, donors nested),
    ``cell_type`` (T/B/NK), ``split`` (train/test by donor), ``n_counts`` (row sums). var_names are
    gene symbols, ``var["ensembl_id"]`` their Ensembl ids. A gene program links CD3E, CD3D, IL7R,
    CCR7, CD4 and CD8A in every cell; S100A8, S100A9, LYZ and CD14 co-vary in case cells only.
    ``sparse`` gives scipy CSR matrices, else dense numpy arrays holding the same values.
    """
    import anndata as ad

    counts, obs = _fixture_counts(seed)
    matrix = counts.astype(np.float32)
    var = pd.DataFrame(
        {"ensembl_id": [ensembl for _, ensembl in GENES]}, index=pd.Index([symbol for symbol, _ in GENES])
    )
    X = sp.csr_matrix(matrix) if sparse else matrix
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.layers["counts"] = X.copy()
    return adata


def make_ground_truth() -> GroundTruth:
    """Undirected edges among the co-regulated genes of the fixture (see :func:`make_adata`)."""
    pairs = [(a, b) for group in (_PROGRAM, _CASE_PROGRAM) for a, b in zip(group, group[1:])]
    pairs += [("CD3E", "IL7R"), ("S100A8", "LYZ")]
    edges = pd.DataFrame(pairs, columns=["source", "target"])
    return GroundTruth(edges=edges, directed=False, name="contract_fixture")


def make_interactions(adata: anndata.AnnData | None = None, extractor: str = "contract") -> Interactions:
    """Gene pairs of the fixture ranked by |Pearson correlation| of log1p counts (for evaluators)."""
    adata = adata if adata is not None else make_adata()
    matrix = _dense(adata.layers["counts"] if "counts" in adata.layers else adata.X).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = np.corrcoef(np.log1p(matrix), rowvar=False)
    return Interactions.from_matrix(
        np.nan_to_num(correlation), list(adata.var_names), directed=False, extractor=extractor, rank_by="abs"
    )


def make_context(
    adata: anndata.AnnData | None = None,
    *,
    seed: int = 0,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 0.001,
    **fields: Any,
) -> RunContext:
    """A RunContext over the fixture: roles of :data:`ROLES` and ``train`` settings that train for
    ``epochs`` on the CPU. ``fields`` set other RunContext fields (tokens, model, ...)."""
    from grnx_core.recipe import TrainSettings

    train = TrainSettings(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        validation_fraction=0.0,
        device="cpu",
    )
    roles = DataRoles(**ROLES.__dict__)
    return RunContext(seed=seed, roles=roles, train_settings=train, adata=adata, **fields)


@dataclass(frozen=True)
class FixtureFiles:
    """Files :func:`write_fixture_files` wrote, holding the fixture for file-reading components."""

    folder: Path
    #: the fixture as .h5ad with CSR counts in X, and with dense counts in X.
    h5ad: Path
    h5ad_dense: Path
    #: dense counts table, genes x cells (first column: gene symbols).
    csv: Path
    #: 10x folder: matrix.mtx (genes x cells), features.tsv (id, symbol, type), barcodes.tsv.
    mtx_folder: Path
    #: ROSMAP layout: counts with obs "library" (one per donor), library -> projid, projid -> cogdx.
    rosmap_counts: Path
    rosmap_batches: Path
    rosmap_clinical: Path
    #: annotation of 50 of the 60 cells (columns cell, annotation).
    annotation: Path
    #: symbol -> Ensembl table (gene_symbol, ensembl_id) for 28 of the 30 genes.
    gene_table: Path
    #: Geneformer-style token dictionary (special tokens, then the fixture's Ensembl ids), JSON.
    token_dictionary: Path


def write_fixture_files(folder: str | Path) -> FixtureFiles:
    """Write the fixture in the file formats the data sources and dictionaries read."""
    from scipy.io import mmwrite

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adata = make_adata(sparse=True)
    counts = _dense(adata.layers["counts"]).astype(np.int64)
    h5ad, h5ad_dense = folder / "fixture.h5ad", folder / "fixture_dense.h5ad"
    plain = adata.copy()
    del plain.layers["counts"]
    plain.write_h5ad(h5ad)
    dense = make_adata(sparse=False)
    del dense.layers["counts"]
    dense.write_h5ad(h5ad_dense)

    csv = folder / "expression.csv"
    pd.DataFrame(counts.T, index=adata.var_names, columns=adata.obs_names).to_csv(csv)

    mtx = folder / "mtx"
    mtx.mkdir(exist_ok=True)
    mmwrite(str(mtx / "matrix.mtx"), sp.coo_matrix(counts.T))
    features = pd.DataFrame(
        {"id": adata.var["ensembl_id"], "symbol": adata.var_names, "type": "Gene Expression"}
    )
    features.to_csv(mtx / "features.tsv", sep="\t", header=False, index=False)
    pd.Series(adata.obs_names).to_csv(mtx / "barcodes.tsv", header=False, index=False)

    rosmap = adata.copy()
    del rosmap.layers["counts"]
    rosmap.obs = pd.DataFrame(
        {"library": rosmap.obs["donor"].astype(str).str.replace("donor", "lib")}, index=rosmap.obs_names
    )
    rosmap_counts = folder / "rosmap_counts.h5ad"
    rosmap.write_h5ad(rosmap_counts)
    libraries = sorted(set(rosmap.obs["library"]))
    rosmap_batches, rosmap_clinical = folder / "rosmap_batches.csv", folder / "rosmap_clinical.csv"
    pd.DataFrame({"library": libraries, "projid": [f"P{i}" for i in range(len(libraries))]}).to_csv(
        rosmap_batches, index=False
    )
    pd.DataFrame(
        {
            "projid": [f"P{i}" for i in range(len(libraries))],
            "cogdx": [4 if i < N_DONORS // 2 else 1 for i in range(len(libraries))],
        }
    ).to_csv(rosmap_clinical, index=False)

    annotation = folder / "annotation.csv"
    pd.DataFrame(
        {"cell": adata.obs_names[:50], "annotation": adata.obs["cell_type"].astype(str)[:50]}
    ).to_csv(annotation, index=False)
    gene_table = folder / "gene_table.tsv"
    adata.var.reset_index(names="gene_symbol").iloc[:28].to_csv(gene_table, sep="\t", index=False)
    token_dictionary = folder / "token_dictionary.json"
    tokens = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    tokens.update({ensembl: 4 + i for i, (_, ensembl) in enumerate(GENES)})
    token_dictionary.write_text(json.dumps(tokens), encoding="utf-8")
    return FixtureFiles(
        folder=folder,
        h5ad=h5ad,
        h5ad_dense=h5ad_dense,
        csv=csv,
        mtx_folder=mtx,
        rosmap_counts=rosmap_counts,
        rosmap_batches=rosmap_batches,
        rosmap_clinical=rosmap_clinical,
        annotation=annotation,
        gene_table=gene_table,
        token_dictionary=token_dictionary,
    )


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

#: Parameters, or a function of the fixture files returning them (for paths).
ParamsSpec = Mapping[str, Any] | Callable[[FixtureFiles], Mapping[str, Any]]
#: An upstream component: its registered name (or class) and its parameters.
StageSpec = tuple[str | type[Component], ParamsSpec]


@dataclass(frozen=True)
class Case:
    """How the suite runs one component: its parameters and what earlier stages it needs.

    ``params`` may be a function of the :class:`FixtureFiles` (for file paths). ``before`` are
    preprocessors run on the fixture first (e.g. ``neighbors`` before ``leiden``). ``tokenizer``
    and ``model`` give token-reading models, extractors and evaluators what they read;
    ``dense_params`` lets a data source read the same data stored dense (for ``sparse_dense``).
    ``skip`` skips every check with that reason; ``xfail`` maps a check to the reason it is a known
    bug of the component (used by :func:`pytest_params`).
    """

    params: ParamsSpec = field(default_factory=dict)
    name: str = ""
    before: tuple[StageSpec, ...] = ()
    tokenizer: StageSpec | None = None
    model: StageSpec | None = None
    dense_params: ParamsSpec | None = None
    skip: str | None = None
    xfail: Mapping[str, str] = field(default_factory=dict)


#: The checks of each kind, in the order they run.
KIND_CHECKS: dict[Kind, tuple[str, ...]] = {
    Kind.DATA: ("returns_type", "counts_declared", "same_seed", "sparse_dense"),
    Kind.PREPROCESSOR: ("returns_type", "writes_declared", "same_seed", "sparse_dense"),
    Kind.SAMPLER: ("returns_type", "same_seed", "sparse_dense", "backed", "save_load"),
    Kind.TOKENIZER: ("returns_type", "same_seed", "sparse_dense", "streamed", "save_load"),
    Kind.MODEL: ("returns_type", "same_seed", "sparse_dense", "save_load"),
    Kind.EXTRACTOR: ("returns_type", "same_seed", "sparse_dense", "save_load"),
    Kind.EVALUATOR: ("returns_type", "same_seed", "sparse_dense", "aggregate"),
}

#: Tiny settings of the built-in tokenizers used when a case names no tokenizer (models).
DEFAULT_TOKENIZER: StageSpec = ("expression_scaled", {"max_length": 16})


class ComponentChecker:
    """Runs the checks of one component class with one :class:`Case`, caching shared runs.

    Several checks reuse the same runs (the first run on CSR data serves ``returns_type``,
    ``same_seed`` and ``save_load``), so a component is fitted at most three times.
    """

    def __init__(
        self,
        component: type[Component] | ComponentEntry,
        case: Case | None = None,
        *,
        registry: Registry | None = None,
        files: FixtureFiles | Callable[[], FixtureFiles] | None = None,
    ) -> None:
        self._entry = None if isinstance(component, type) else component
        self._component = component if isinstance(component, type) else None
        self.case = case or Case()
        self._registry = registry
        self._files_source = files
        self._files: FixtureFiles | None = files if isinstance(files, FixtureFiles) else None
        self._cache: dict[Any, Any] = {}
        self._folder: Path | None = None

    # -- identity ------------------------------------------------------------------------------

    @property
    def cls(self) -> type[Component]:
        if self._component is None:
            assert self._entry is not None  # __init__ sets one of the two
            self._component = self._entry.load()
        return self._component

    @property
    def kind(self) -> Kind:
        return self._entry.kind if self._entry is not None else self.cls.kind

    @property
    def name(self) -> str:
        return self._entry.name if self._entry is not None else self.cls.name

    @property
    def label(self) -> str:
        """``kind:name`` plus the case name when it has one (pytest ids, messages)."""
        suffix = f"[{self.case.name}]" if self.case.name else ""
        return f"{self.kind.value}:{self.name}{suffix}"

    def checks(self) -> tuple[str, ...]:
        """The checks that apply to this component (see :data:`KIND_CHECKS`)."""
        kind, cls = self.kind, self.cls
        chosen = []
        for check in KIND_CHECKS[kind]:
            if kind is Kind.DATA and check == "sparse_dense" and self.case.dense_params is None:
                continue  # a source reads one stored layout unless the case gives a dense twin
            if (
                check == "streamed"
                and "path" not in inspect.signature(cast(type[Tokenizer], cls).transform).parameters
            ):
                continue
            if check == "aggregate" and not callable(getattr(cls, "aggregate", None)):
                continue
            chosen.append(check)
        return tuple(chosen)

    def run(self, check: str) -> None:
        """Run one check: AssertionError when the component breaks it, SkipComponent when it cannot run."""
        if check not in KIND_CHECKS[self.kind]:
            raise ValueError(f"{check!r} is not a check of kind {self.kind.value}; see KIND_CHECKS.")
        if self.case.skip:
            raise SkipComponent(self.case.skip)
        method = getattr(self, f"_{check}")
        method()

    # -- shared helpers -------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """A temporary folder for this checker, removed when it is garbage-collected."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix=f"grnx-contract-{self.name}-"))
            weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder

    @property
    def files(self) -> FixtureFiles:
        if self._files is None and callable(self._files_source):
            self._files = self._files_source()
        if self._files is None:
            self._files = write_fixture_files(self.folder / "fixture")
        return self._files

    def _params(self, spec: ParamsSpec | None = None) -> dict[str, Any]:
        spec = self.case.params if spec is None else spec
        return dict(spec(self.files) if callable(spec) else spec)

    def build(self, params: ParamsSpec | None = None) -> Component:
        """A fresh instance of the component with the case's parameters."""
        from pydantic import ValidationError

        resolved = self._params(params)
        try:
            return self.cls(**resolved)
        except ValidationError as error:
            required = [n for n, f in self.cls.Params.model_fields.items() if f.is_required()]
            if not resolved and required:
                raise SkipComponent(
                    f"{self.label} has required parameters ({', '.join(required)}); give them with "
                    f"Case(params=...)."
                ) from error
            raise

    def _registry_get(self, kind: Kind, name: str) -> type[Component]:
        if self._registry is None:
            from grnx_core.registry import default_registry

            self._registry = default_registry()
        return self._registry.get(kind, name)

    def _stage(self, kind: Kind, spec: StageSpec) -> Component:
        target, params = spec
        if isinstance(target, str):
            target = self._registry_get(kind, target)
        resolved = dict(params(self.files) if callable(params) else params)
        return target(**resolved)

    def _memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def fail(self, check: str, message: str) -> AssertionError:
        return AssertionError(f"{self.label} fails {check}: {message}")

    def _input(self, variant: str) -> anndata.AnnData:
        """The fixture (CSR or dense) after the case's ``before`` steps; a fresh copy each call."""

        def prepare() -> anndata.AnnData:
            adata = make_adata(sparse=variant == "sparse")
            for spec in self.case.before:
                adata = cast(Preprocessor, self._stage(Kind.PREPROCESSOR, spec))(adata)
            return adata

        return self._memo(("input", variant), prepare).copy()

    # -- runs by kind ----------------------------------------------------------------------------

    def output(self, variant: str = "sparse", run: int = 0) -> Any:
        """The component's output on the CSR (``sparse``) or dense fixture; ``run`` 0 or 1."""
        runner = getattr(self, f"_run_{self.kind.name.lower()}")
        return self._memo(("output", variant, run), lambda: runner(variant))

    def _run_data(self, variant: str) -> anndata.AnnData:
        source = cast(DataSource, self.build(self.case.dense_params if variant == "dense" else None))
        return source.load()

    def _run_preprocessor(self, variant: str) -> anndata.AnnData:
        return cast(Preprocessor, self.build())(self._input(variant))

    def _run_sampler(self, variant: str) -> CellSample:
        return cast(Sampler, self.build()).sample(self._input(variant), np.random.default_rng(0))

    def _run_tokenizer(self, variant: str) -> tuple[Any, TokenizedCells]:
        tokenizer = cast(Tokenizer, self.build())
        adata = self._input(variant)
        fitted = tokenizer.fit(_train_cells(adata))
        if fitted is not tokenizer:
            raise self.fail("returns_type", f"fit(adata) returned {fitted!r}, not the tokenizer itself")
        return tokenizer, tokenizer.transform(adata, obs_columns=list(OBS_COLUMNS))

    def _tokens(self, variant: str) -> tuple[Any, TokenizedCells] | None:
        """Upstream tokens for models, extractors and evaluators (None when nothing reads tokens)."""
        spec = self.case.tokenizer
        if spec is None:
            reader = self.cls if self.kind is Kind.MODEL else None
            if reader is None and self.case.model is not None:
                target = self.case.model[0]
                reader = target if isinstance(target, type) else self._registry_get(Kind.MODEL, target)
            if reader is None or getattr(reader, "input_kind", "tokens") != "tokens":
                return None
            spec = DEFAULT_TOKENIZER

        def compute() -> tuple[Any, TokenizedCells]:
            tokenizer = cast(Tokenizer, self._stage(Kind.TOKENIZER, spec))
            adata = self._input(variant)
            tokenizer.fit(_train_cells(adata))
            return tokenizer, tokenizer.transform(adata, obs_columns=list(OBS_COLUMNS))

        return self._memo(("tokens", variant), compute)

    def _context(self, variant: str, **fields: Any) -> RunContext:
        tokens = self._tokens(variant)
        if tokens is not None:
            fields.setdefault("tokenizer", tokens[0])
            fields.setdefault("tokens", tokens[1])
        return make_context(self._input(variant), **fields)

    def _run_model(self, variant: str) -> tuple[Any, np.ndarray, np.ndarray, Any]:
        model = cast(Model, self.build())
        context = self._context(variant)
        fitted = model.fit(context)
        if fitted is not model:
            raise self.fail("returns_type", f"fit(context) returned {fitted!r}, not the model itself")
        inputs = context.adata if getattr(model, "input_kind", "tokens") == "adata" else context.tokens
        return model, np.asarray(model.predict(inputs)), np.asarray(model.embed(inputs)), inputs

    def _upstream_model(self) -> Any:
        """The case's model, fitted once on the CSR fixture and shared by every run."""
        spec = self.case.model
        if spec is None:
            needs = getattr(self.cls, "needs", None) or ()
            if "model" in needs:
                raise SkipComponent(f"{self.label} needs a model; give one with Case(model=(name, params)).")
            return None

        def fit() -> Any:
            model = cast(Model, self._stage(Kind.MODEL, spec))
            return model.fit(self._context("sparse"))

        return self._memo("model", fit)

    def _run_extractor(self, variant: str) -> Interactions:
        context = self._context(variant, model=self._upstream_model())
        return cast(Extractor, self.build()).extract(context)

    def _run_evaluator(self, variant: str) -> tuple[EvaluationResult, RunContext]:
        adata = self._input(variant)
        context = self._context(
            variant,
            model=self._upstream_model(),
            ground_truth=make_ground_truth(),
            interactions={"contract": make_interactions(adata)},
        )
        return cast(Evaluator, self.build()).evaluate(context), context

    # -- checks ------------------------------------------------------------------------------------

    def _returns_type(self) -> None:
        check = "returns_type"
        output = self.output()
        getattr(self, f"_valid_{self.kind.name.lower()}")(output, check)

    def _same_seed(self) -> None:
        self._assert_same(self.output("sparse", 0), self.output("sparse", 1), "same_seed", exact=True)

    def _sparse_dense(self) -> None:
        self._assert_same(self.output("sparse", 0), self.output("dense", 0), "sparse_dense", exact=False)

    def _assert_same(self, first: Any, second: Any, check: str, exact: bool) -> None:
        kind = self.kind
        if kind is Kind.DATA and check == "sparse_dense":
            # The two runs read two files: provenance naming the file may differ, nothing else.
            first, second = _without_path(first), _without_path(second)
        if kind in (Kind.DATA, Kind.PREPROCESSOR):
            problems = compare_adata(first, second, exact=exact)
        elif kind is Kind.SAMPLER:
            problems = compare_samples(first, second, exact=exact)
        elif kind is Kind.TOKENIZER:
            problems = compare_tokens(first[1], second[1], exact=exact)
        elif kind is Kind.MODEL:
            problems = compare_values(first[1], second[1], "predictions", exact=True)
            problems += compare_values(first[2], second[2], "embeddings", exact=exact)
        elif kind is Kind.EXTRACTOR:
            problems = compare_interactions(first, second, exact=exact)
        else:
            problems = compare_values(first[0].metrics, second[0].metrics, "metrics", exact=exact)
        if problems:
            what = (
                "two runs with the same seed differ"
                if check == "same_seed"
                else "CSR and dense inputs differ"
            )
            raise self.fail(check, f"{what}: " + "; ".join(problems[:8]))

    def _writes_declared(self) -> None:
        before = self._input("sparse")
        after = self.output("sparse", 0)
        declared = declared_writes(self.build())
        undeclared = sorted(key for key in written_keys(before, after) if not _is_declared(key, declared))
        if undeclared:
            raise self.fail(
                "writes_declared",
                f"it writes {', '.join(undeclared)}, which its writes {tuple(type(cast(Preprocessor, self.build())).writes)!r} "
                f"(resolved: {', '.join(sorted(declared)) or 'nothing'}) does not declare",
            )

    def _backed(self) -> None:
        import anndata as ad

        path = self.folder / "backed.h5ad"
        if not path.exists():
            self._input("sparse").write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        try:
            sample = cast(Sampler, self.build()).sample(backed, np.random.default_rng(0))
        finally:
            backed.file.close()
        self._valid_sampler(sample, "backed")
        problems = compare_samples(self.output("sparse", 0), sample, exact=True)
        if problems:
            raise self.fail(
                "backed", "a backed AnnData gives another sample than in memory: " + "; ".join(problems)
            )

    def _streamed(self) -> None:
        tokenizer, tokens = self.output("sparse", 0)
        folder = self.folder / "streamed"
        shutil.rmtree(folder, ignore_errors=True)
        streamed = tokenizer.transform(self._input("sparse"), obs_columns=list(OBS_COLUMNS), path=folder)
        if not isinstance(streamed, TokenizedCells):
            raise self.fail("streamed", f"transform(..., path=...) returned {type(streamed).__name__}")
        problems = compare_tokens(tokens, streamed, exact=True)
        problems += compare_tokens(tokens, TokenizedCells.load(folder), exact=True)
        if problems:
            raise self.fail(
                "streamed",
                "tokens streamed to a folder differ from the in-memory ones: " + "; ".join(problems[:8]),
            )

    def _save_load(self) -> None:
        getattr(self, f"_save_load_{self.kind.name.lower()}")()

    def _save_load_sampler(self) -> None:
        sample = self.output("sparse", 0)
        path = self.folder / "sample.npz"
        sample.save(path)
        loaded = CellSample.load(path)
        problems = compare_samples(sample, loaded, exact=True)
        problems += compare_values(sample.info, loaded.info, "info", exact=True)
        if problems:
            raise self.fail("save_load", "CellSample.save/load changes the sample: " + "; ".join(problems))

    def _save_load_tokenizer(self) -> None:
        tokenizer, tokens = self.output("sparse", 0)
        saved = self.folder / "tokens"
        tokens.save(saved)
        problems = compare_tokens(tokens, TokenizedCells.load(saved), exact=True)
        if problems:
            raise self.fail(
                "save_load", "TokenizedCells.save/load changes the tokens: " + "; ".join(problems)
            )
        state = self.folder / "tokenizer"
        tokenizer.save(state)
        loaded = type(tokenizer).load(state)
        if type(loaded) is not type(tokenizer):
            raise self.fail("save_load", f"{type(tokenizer).__name__}.load returned {type(loaded).__name__}")
        again = loaded.transform(self._input("sparse"), obs_columns=list(OBS_COLUMNS))
        problems = compare_tokens(tokens, again, exact=True)
        if problems:
            raise self.fail(
                "save_load", "the loaded tokenizer transforms to other tokens: " + "; ".join(problems)
            )

    def _save_load_model(self) -> None:
        model, predictions, embeddings, inputs = self.output("sparse", 0)
        path = self.folder / "model"
        model.save(path)
        loaded = type(model).load(path)
        if type(loaded) is not type(model):
            raise self.fail("save_load", f"{type(model).__name__}.load returned {type(loaded).__name__}")
        problems = compare_values(predictions, np.asarray(loaded.predict(inputs)), "predictions", exact=True)
        problems += compare_values(embeddings, np.asarray(loaded.embed(inputs)), "embeddings", exact=False)
        if problems:
            raise self.fail("save_load", "the loaded model gives other outputs: " + "; ".join(problems))

    def _save_load_extractor(self) -> None:
        interactions = self.output("sparse", 0)
        path = self.folder / "interactions.parquet"
        interactions.save(path)
        problems = compare_interactions(interactions, Interactions.load(path), exact=True, order=True)
        if problems:
            raise self.fail("save_load", "Interactions.save/load changes the table: " + "; ".join(problems))

    def _aggregate(self) -> None:
        first, context = self.output("sparse", 0)
        second, _ = self.output("sparse", 1)
        component: Any = self.build()  # aggregate is an optional hook that Evaluator does not declare
        aggregated = component.aggregate([first, second], first if component.needs_reference else None)
        if not isinstance(aggregated, Mapping):
            raise self.fail(
                "aggregate", f"aggregate returned {type(aggregated).__name__}, expected a dict of metrics"
            )
        self._check_metrics(aggregated, "aggregate")

    # -- validity by kind ---------------------------------------------------------------------------

    def _valid_data(self, adata: Any, check: str) -> None:
        import anndata as ad

        if not isinstance(adata, ad.AnnData):
            raise self.fail(check, f"load() returned {type(adata).__name__}, not an AnnData")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise self.fail(check, f"load() returned {adata.n_obs} cells x {adata.n_vars} genes")
        for axis, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
            if not names.is_unique:
                raise self.fail(check, f"{axis} are not unique ({names[names.duplicated()][:3].tolist()})")
        if "counts" in adata.layers and adata.layers["counts"].shape != adata.shape:
            raise self.fail(check, "layers['counts'] does not have the shape of X")
        source = cast(DataSource, self.build())
        for path in source.input_files():
            if not Path(path).exists():
                raise self.fail(check, f"input_files() lists {path}, which does not exist")
        listed = source.obs_columns()
        if listed is not None and set(listed) != set(map(str, adata.obs.columns)):
            raise self.fail(
                check,
                f"obs_columns() says {sorted(listed)} but load() gives {sorted(map(str, adata.obs.columns))}: "
                "validation would refuse a data role that works (or pass one that fails)",
            )
        truth = source.ground_truth()
        if truth is not None:
            if not isinstance(truth, pd.DataFrame) or not {"source", "target"} <= set(truth.columns):
                raise self.fail(
                    check, "ground_truth() must return a DataFrame with columns source and target"
                )
            outside = sorted(set(truth["source"]).union(truth["target"]) - set(map(str, adata.var_names)))
            if outside:
                raise self.fail(check, f"ground_truth() names genes that are not var_names: {outside[:5]}")

    def _counts_declared(self) -> None:
        """``uns["grnx_data"]["counts"]`` says where the raw counts are, and they are integers there."""
        check, adata = "counts_declared", self.output()
        self._valid_data(adata, check)
        declared = (adata.uns.get("grnx_data") or {}).get("counts")
        if declared is None:
            raise self.fail(
                check,
                "it does not declare where the raw counts are: uns['grnx_data']['counts'] should be "
                "'layers/counts', 'X' or 'none' (uns keys: "
                + (", ".join(map(str, adata.uns)) or "none")
                + ")",
            )
        if declared == "none":
            return
        if declared not in ("layers/counts", "X"):
            raise self.fail(
                check, f"uns['grnx_data']['counts'] is {declared!r}; expected 'layers/counts', 'X' or 'none'"
            )
        if declared == "layers/counts" and "counts" not in adata.layers:
            raise self.fail(
                check, "uns['grnx_data']['counts'] says layers/counts, but there is no such layer"
            )
        matrix = adata.layers["counts"] if declared == "layers/counts" else adata.X
        if not _is_counts(matrix):
            raise self.fail(check, f"the declared counts ({declared}) are not non-negative integers")

    def _valid_preprocessor(self, adata: Any, check: str) -> None:
        import anndata as ad

        if not isinstance(adata, ad.AnnData):
            raise self.fail(check, f"__call__(adata) returned {type(adata).__name__}, not an AnnData")
        if adata.n_obs == 0 or adata.n_vars == 0:
            raise self.fail(check, f"__call__(adata) returned {adata.n_obs} cells x {adata.n_vars} genes")

    def _valid_sampler(self, sample: Any, check: str) -> None:
        if not isinstance(sample, CellSample):
            raise self.fail(check, f"sample(adata, rng) returned {type(sample).__name__}, not a CellSample")
        n_obs = self._input("sparse").n_obs
        indices, weights = sample.indices, sample.weights
        if sample.n_cells_total != n_obs:
            raise self.fail(check, f"n_cells_total is {sample.n_cells_total} for {n_obs} cells")
        if sample.n_cells == 0:
            raise self.fail(check, "the sample is empty")
        if indices.min() < 0 or indices.max() >= n_obs:
            raise self.fail(check, f"indices run from {indices.min()} to {indices.max()} for {n_obs} cells")
        if len(np.unique(indices)) != len(indices):
            raise self.fail(check, "indices repeat a cell")
        if not (np.all(np.isfinite(weights)) and np.all(weights >= 0)):
            raise self.fail(check, "weights must be finite and non-negative")

    def _valid_tokenizer(self, output: Any, check: str) -> None:
        _, tokens = output
        if not isinstance(tokens, TokenizedCells):
            raise self.fail(check, f"transform(adata, obs_columns=...) returned {type(tokens).__name__}")
        adata = self._input("sparse")
        if tokens.n_cells == 0 or tokens.n_cells > adata.n_obs:
            raise self.fail(check, f"{tokens.n_cells} tokenised cells for {adata.n_obs} cells")
        missing = [c for c in OBS_COLUMNS if c not in tokens.obs.columns]
        if missing:
            raise self.fail(check, f"the tokens' obs lacks the asked columns {missing}")
        if not tokens.obs.index.isin(adata.obs_names).all():
            raise self.fail(check, "the tokens' obs index is not made of the data's cell names")
        expected = adata.obs.loc[tokens.obs.index, list(OBS_COLUMNS)].astype(str)
        if not expected.equals(tokens.obs[list(OBS_COLUMNS)].astype(str)):
            raise self.fail(check, "the carried obs values do not match the cells they belong to")
        vocabulary_size = max(len(tokens.vocabulary), int(tokens.metadata.get("vocab_size", 0)))
        if len(tokens.input_ids) and (
            tokens.input_ids.min() < 0 or tokens.input_ids.max() >= vocabulary_size
        ):
            raise self.fail(check, f"token ids outside the vocabulary of {vocabulary_size}")
        if tokens.values is not None and not np.all(np.isfinite(tokens.values)):
            raise self.fail(check, "token values are not finite")

    def _valid_model(self, output: Any, check: str) -> None:
        _, predictions, embeddings, inputs = output
        n_cells = inputs.n_cells if isinstance(inputs, TokenizedCells) else inputs.n_obs
        if predictions.shape[:1] != (n_cells,):
            raise self.fail(check, f"predict gave shape {predictions.shape} for {n_cells} cells")
        labels = sorted(set(map(str, make_adata().obs["label"])))
        if predictions.ndim == 1 and not set(map(str, predictions)) <= set(labels):
            found = sorted(set(map(str, predictions)))[:5]
            raise self.fail(check, f"predictions {found} are not values of the label column {labels}")
        if predictions.ndim == 2 and predictions.shape[1] != len(labels):
            raise self.fail(
                check, f"predict gave {predictions.shape[1]} scores per cell for {len(labels)} labels"
            )
        if predictions.ndim not in (1, 2):
            raise self.fail(check, f"predict gave an array of shape {predictions.shape}")
        if embeddings.ndim != 2 or embeddings.shape[0] != n_cells or embeddings.shape[1] == 0:
            raise self.fail(check, f"embed gave shape {embeddings.shape} for {n_cells} cells")
        if not np.all(np.isfinite(embeddings)):
            raise self.fail(check, "embeddings are not finite")

    def _valid_extractor(self, interactions: Any, check: str) -> None:
        if not isinstance(interactions, Interactions):
            raise self.fail(
                check, f"extract(context) returned {type(interactions).__name__}, not Interactions"
            )
        table = interactions.table
        if len(table) == 0:
            raise self.fail(check, "no gene pairs")
        scores = table["score"].to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(scores)):
            raise self.fail(check, "scores are not finite")
        if np.any(np.diff(scores) > 0):
            raise self.fail(check, "pairs are not sorted by score, descending")
        genes = set(map(str, self._input("sparse").var_names))
        outside = sorted(set(table["source"].astype(str)).union(table["target"].astype(str)) - genes)
        if outside:
            raise self.fail(check, f"gene ids that are not var_names: {outside[:5]}")
        if (table["source"] == table["target"]).any():
            raise self.fail(check, "a gene is paired with itself")
        pairs = interactions.pair_ids()
        if len(np.unique(pairs)) != len(pairs):
            raise self.fail(check, "a pair appears twice")

    def _valid_evaluator(self, output: Any, check: str) -> None:
        import matplotlib.figure

        result, _ = output
        if not isinstance(result, EvaluationResult):
            raise self.fail(
                check, f"evaluate(context) returned {type(result).__name__}, not an EvaluationResult"
            )
        if not result.metrics:
            raise self.fail(check, "no metrics")
        self._check_metrics(result.metrics, check)
        for name, figure in result.figures.items():
            if not isinstance(figure, matplotlib.figure.Figure):
                raise self.fail(
                    check, f"figure {name!r} is a {type(figure).__name__}, not a matplotlib Figure"
                )
        for name, table in result.tables.items():
            if not isinstance(table, pd.DataFrame):
                raise self.fail(check, f"table {name!r} is a {type(table).__name__}, not a DataFrame")

    def _check_metrics(self, metrics: Mapping[str, Any], check: str) -> None:
        evaluator = cast(type[Evaluator], self.cls)
        both = sorted(set(evaluator.higher_is_better) & set(evaluator.informational))
        if both:
            raise self.fail(check, f"metrics both in higher_is_better and informational: {both[:5]}")
        undeclared = [name for name in metrics if not evaluator.declares(name)]
        if undeclared:
            raise self.fail(
                check, f"metrics declared in neither higher_is_better nor informational: {undeclared[:5]}"
            )
        not_numbers = [
            name
            for name, value in metrics.items()
            if not isinstance(value, (int, float, np.number)) or isinstance(value, bool)
        ]
        if not_numbers:
            raise self.fail(check, f"metrics that are not numbers: {not_numbers[:5]}")


# ---------------------------------------------------------------------------------------------
# Comparing outputs
# ---------------------------------------------------------------------------------------------

_RTOL, _ATOL = 1e-4, 1e-5


def _dense(matrix: Any) -> np.ndarray:
    if sp.issparse(matrix):
        return matrix.toarray()
    if hasattr(matrix, "to_memory"):
        matrix = matrix.to_memory()
    return np.asarray(matrix)


def _is_counts(matrix: Any) -> bool:
    values = matrix.data if sp.issparse(matrix) else _dense(matrix)
    return bool(np.all(values >= 0) and np.all(np.mod(values, 1) == 0))


def _without_path(adata: anndata.AnnData) -> anndata.AnnData:
    """A shallow copy of ``adata`` without the file path in ``uns["grnx_data"]``."""
    provenance = adata.uns.get("grnx_data")
    if not isinstance(provenance, Mapping) or "path" not in provenance:
        return adata
    copy = adata.copy()
    copy.uns["grnx_data"] = {k: v for k, v in provenance.items() if k != "path"}
    return copy


def _train_cells(adata: anndata.AnnData) -> anndata.AnnData:
    """The training cells, as the runner fits tokenizers on them."""
    if "split" in adata.obs.columns:
        train = (adata.obs["split"].astype(str) == "train").to_numpy()
        if train.any():
            return adata[train]
    return adata


def compare_values(first: Any, second: Any, where: str, *, exact: bool) -> list[str]:
    """Differences between two nested values (dicts, lists, arrays, frames, sparse, scalars)."""
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        problems = []
        if set(first) != set(second):
            only = sorted(map(str, set(first) ^ set(second)))
            problems.append(f"{where}: keys differ ({', '.join(only[:5])})")
        for key in sorted(set(first) & set(second), key=str):
            problems += compare_values(first[key], second[key], f"{where}[{key!r}]", exact=exact)
        return problems
    if isinstance(first, pd.DataFrame) and isinstance(second, pd.DataFrame):
        if list(first.columns) != list(second.columns) or not first.index.equals(second.index):
            return [f"{where}: columns or index differ"]
        problems = []
        for column in first.columns:
            problems += compare_values(first[column], second[column], f"{where}[{column!r}]", exact=exact)
        return problems
    if isinstance(first, pd.Series) and isinstance(second, pd.Series):
        return compare_values(_series_values(first), _series_values(second), where, exact=exact)
    if (
        sp.issparse(first)
        or sp.issparse(second)
        or isinstance(first, np.ndarray)
        or isinstance(second, np.ndarray)
    ):
        a, b = _dense(first), _dense(second)
        if a.shape != b.shape:
            return [f"{where}: shape {a.shape} vs {b.shape}"]
        if a.dtype.kind in "biuf" and b.dtype.kind in "biuf":
            single = np.float32 in (a.dtype, b.dtype)
            a, b = a.astype(np.float64), b.astype(np.float64)
            atol = _ATOL
            if single and a.size:  # float32 round-off scales with the array's largest values
                atol = max(_ATOL, _RTOL * float(np.nanmax(np.abs(b), initial=0.0)))
            equal = (
                np.array_equal(a, b, equal_nan=True)
                if exact
                else np.allclose(a, b, _RTOL, atol, equal_nan=True)
            )
            if not equal:
                difference = np.nanmax(np.abs(a - b)) if a.size else 0.0
                return [f"{where}: values differ (max |difference| {difference:.3g})"]
            return []
        if not np.array_equal(a.astype(str), b.astype(str)):
            return [f"{where}: values differ"]
        return []
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        if len(first) != len(second):
            return [f"{where}: length {len(first)} vs {len(second)}"]
        problems = []
        for i, (a, b) in enumerate(zip(first, second)):
            problems += compare_values(a, b, f"{where}[{i}]", exact=exact)
        return problems
    if _is_number(first) and _is_number(second):
        x, y = float(first), float(second)
        if math.isnan(x) and math.isnan(y):
            return []
        if x == y or (not exact and math.isclose(x, y, rel_tol=_RTOL, abs_tol=_ATOL)):
            return []
        return [f"{where}: {first!r} vs {second!r}"]
    if type(first) is not type(second) and not (isinstance(first, str) and isinstance(second, str)):
        return [f"{where}: {type(first).__name__} vs {type(second).__name__}"]
    try:
        equal = bool(first == second)
    except Exception:  # objects without a usable ==
        equal = first is second
    return [] if equal else [f"{where}: {first!r} vs {second!r}"]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _series_values(series: pd.Series) -> np.ndarray:
    """Values of a column; categoricals as their values, so unused categories do not count."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        return np.asarray(series.astype(object).to_numpy())
    values = series.to_numpy()
    return values if values.dtype.kind in "biuf" else values.astype(object)


def compare_adata(first: anndata.AnnData, second: anndata.AnnData, *, exact: bool) -> list[str]:
    """Differences between two AnnData: names, X, layers, obs, var, obsm, varm, obsp, varp, uns, raw.

    With ``exact`` False, sparse and dense storage of the same values count as equal.
    """
    problems = []
    for axis in ("obs_names", "var_names"):
        if not getattr(first, axis).equals(getattr(second, axis)):
            problems.append(f"{axis} differ")
    if problems:
        return problems
    if exact and sp.issparse(first.X) != sp.issparse(second.X):
        problems.append("X is sparse in one run only")
    problems += compare_values(first.X, second.X, "X", exact=exact)
    for slot in ("layers", "obsm", "varm", "obsp", "varp"):
        problems += compare_values(dict(getattr(first, slot)), dict(getattr(second, slot)), slot, exact=exact)
    problems += compare_values(first.obs, second.obs, "obs", exact=exact)
    problems += compare_values(first.var, second.var, "var", exact=exact)
    problems += compare_values(dict(first.uns), dict(second.uns), "uns", exact=exact)
    if (first.raw is None) != (second.raw is None):
        problems.append("raw is set in one output only")
    elif first.raw is not None:
        problems += compare_values(first.raw.X, second.raw.X, "raw.X", exact=exact)
    return problems


def compare_samples(first: CellSample, second: CellSample, *, exact: bool) -> list[str]:
    """Differences between two cell samples (indices, weights, n_cells_total; not ``info``)."""
    problems = compare_values(first.indices, second.indices, "indices", exact=True)
    if not problems:
        problems += compare_values(first.weights, second.weights, "weights", exact=exact)
    if first.n_cells_total != second.n_cells_total:
        problems.append(f"n_cells_total {first.n_cells_total} vs {second.n_cells_total}")
    return problems


def compare_tokens(first: TokenizedCells, second: TokenizedCells, *, exact: bool) -> list[str]:
    """Differences between two TokenizedCells (ids, offsets, values, obs, vocabulary, metadata)."""
    problems = compare_values(first.offsets, second.offsets, "offsets", exact=True)
    problems += compare_values(first.input_ids, second.input_ids, "input_ids", exact=True)
    if (first.values is None) != (second.values is None):
        problems.append("values are present in one output only")
    elif first.values is not None:
        problems += compare_values(first.values, second.values, "values", exact=exact)
    problems += compare_values(first.obs, second.obs, "obs", exact=True)
    problems += compare_values(list(first.vocabulary), list(second.vocabulary), "vocabulary", exact=True)
    problems += compare_values(first.metadata, second.metadata, "metadata", exact=True)
    return problems


def compare_interactions(
    first: Interactions, second: Interactions, *, exact: bool, order: bool | None = None
) -> list[str]:
    """Differences between two Interactions. ``order`` (default: ``exact``) also compares row order;
    without it pairs are matched by id, since scores equal within rounding may swap places."""
    order = exact if order is None else order
    problems = []
    if first.directed != second.directed:
        problems.append(f"directed {first.directed} vs {second.directed}")
    if list(first.genes) != list(second.genes):
        problems.append("gene universes differ")
    if set(first.table.columns) != set(second.table.columns):
        problems.append(f"columns {list(first.table.columns)} vs {list(second.table.columns)}")
        return problems
    if order:
        problems += compare_values(first.table, second.table[list(first.table.columns)], "table", exact=exact)
    else:
        a = first.table.assign(pair=first.pair_ids()).set_index("pair").sort_index()
        b = second.table.assign(pair=second.pair_ids()).set_index("pair").sort_index()
        if not a.index.equals(b.index):
            problems.append(f"the pairs differ ({len(a.index.symmetric_difference(b.index))} not in both)")
        else:
            numeric = [c for c in a.columns if c not in ("source", "target")]
            problems += compare_values(a[numeric], b[numeric], "table", exact=exact)
    problems += compare_values(first.metadata, second.metadata, "metadata", exact=exact)
    return problems


# ---------------------------------------------------------------------------------------------
# Declared writes of preprocessors
# ---------------------------------------------------------------------------------------------

_SLOTS = ("obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns")
_WHOLE = ("X", "raw", "obs_names", "var_names")


def _parse_write(entry: str) -> tuple[str, str | None]:
    """``"obs/split"``, ``"obs['split']"`` or ``'obs["split"]'`` -> ("obs", "split"); ``"X"`` -> ("X", None)."""
    text = entry.strip()
    if "[" in text and text.endswith("]"):
        slot, _, key = text[:-1].partition("[")
        return slot.strip(), key.strip().strip("'\"")
    slot, _, key = text.partition("/")
    return slot.strip(), (key.strip() or None)


def declared_writes(component: Any) -> set[str]:
    """The keys a preprocessor declares in ``writes``, as ``"slot/key"`` (``"X"`` for whole slots).

    ``<param>`` placeholders take the component's parameter value: a name, each name of a list,
    nothing when the value is None. ``"layers/*"`` declares every key of the slot.
    """
    keys: set[str] = set()
    for entry in getattr(type(component), "writes", ()):
        slot, key = _parse_write(entry)
        if slot not in _SLOTS + _WHOLE:
            raise AssertionError(
                f"{type(component).__name__}.writes has {entry!r}; write entries look like 'X', 'raw', "
                f"'var_names', 'obs/<column>' or \"obsm['X_pca']\" (slots: {', '.join(_SLOTS)})"
            )
        if key is None:
            keys.add(slot)
        elif key.startswith("<") and key.endswith(">"):
            value = getattr(component, key[1:-1])
            names = [] if value is None else [value] if isinstance(value, str) else list(value)
            keys.update(f"{slot}/{name}" for name in names)
        else:
            keys.add(f"{slot}/{key}")
    return keys


def _is_declared(key: str, declared: set[str]) -> bool:
    slot = key.split("/", 1)[0]
    return key in declared or f"{slot}/*" in declared or slot in declared


def written_keys(before: anndata.AnnData, after: anndata.AnnData) -> set[str]:
    """The keys (``"slot/key"``, or ``"X"``, ``"raw"``, ``"var_names"``, ``"obs_names"``) that
    ``after`` added, removed or changed relative to ``before``.

    Removing cells or genes is not a write: values are compared on the cells and genes ``after``
    kept, matched by name. Genes renamed (``var_names`` written) are compared by presence only.
    """
    written: set[str] = set()
    cells = before.obs_names.get_indexer(after.obs_names)
    if (cells < 0).any() or not after.obs_names.is_unique:
        written.add("obs_names")
    genes = before.var_names.get_indexer(after.var_names)
    renamed = bool((genes < 0).any())
    if renamed:
        written.add("var_names")
    elif not np.all(np.diff(genes) > 0):
        written.add("var_names")  # genes reordered
    cells_ok = "obs_names" not in written
    genes_ok = not renamed

    if cells_ok and genes_ok:
        old_x = (
            before.X[cells][:, genes] if sp.issparse(before.X) else np.asarray(before.X)[np.ix_(cells, genes)]
        )
        if _differs(old_x, after.X):
            written.add("X")
    elif after.shape != before.shape or _differs(before.X, after.X):
        written.add("X")
    for slot, axis_ok, index, both in (
        ("layers", cells_ok and genes_ok, None, None),
        ("obsm", cells_ok, cells, False),
        ("obsp", cells_ok, cells, True),
        ("varm", genes_ok, genes, False),
        ("varp", genes_ok, genes, True),
    ):
        old, new = getattr(before, slot), getattr(after, slot)
        for key in set(old) ^ set(new):
            written.add(f"{slot}/{key}")
        for key in set(old) & set(new):
            if not axis_ok:
                continue
            if slot == "layers":
                value = old[key]
                subset = (
                    value[cells][:, genes] if sp.issparse(value) else np.asarray(value)[np.ix_(cells, genes)]
                )
            elif both:
                value = old[key]
                assert index is not None  # obsp and varp come with their index
                subset = (
                    value[index][:, index] if sp.issparse(value) else np.asarray(value)[np.ix_(index, index)]
                )
            else:
                subset = old[key].iloc[index] if isinstance(old[key], pd.DataFrame) else old[key][index]
            if _differs(subset, new[key]):
                written.add(f"{slot}/{key}")
    for slot, axis_ok, index in (("obs", cells_ok, cells), ("var", genes_ok, genes)):
        old, new = getattr(before, slot), getattr(after, slot)
        for key in set(old.columns) ^ set(new.columns):
            written.add(f"{slot}/{key}")
        if axis_ok:
            for key in set(old.columns) & set(new.columns):
                if compare_values(old[key].iloc[index], new[key], key, exact=True):
                    written.add(f"{slot}/{key}")
    for key in set(before.uns) ^ set(after.uns):
        written.add(f"uns/{key}")
    for key in set(before.uns) & set(after.uns):
        if compare_values(before.uns[key], after.uns[key], key, exact=True):
            written.add(f"uns/{key}")
    if (before.raw is None) != (after.raw is None):
        written.add("raw")
    elif before.raw is not None and (
        not before.raw.var_names.equals(after.raw.var_names) or _differs(before.raw.X, after.raw.X)
    ):
        written.add("raw")
    return written


def _differs(first: Any, second: Any) -> bool:
    a, b = _dense(first), _dense(second)
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    return not np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# ---------------------------------------------------------------------------------------------
# Running checks
# ---------------------------------------------------------------------------------------------


class _SharedFiles:
    """Fixture files written once, on first use, for many checkers; removed with the last of them."""

    def __init__(self) -> None:
        self._files: FixtureFiles | None = None

    def __call__(self) -> FixtureFiles:
        if self._files is None:
            folder = Path(tempfile.mkdtemp(prefix="grnx-contract-files-"))
            weakref.finalize(self, shutil.rmtree, str(folder), True)
            self._files = write_fixture_files(folder)
        return self._files


@dataclass
class CheckItem:
    """One check of one component case, ready to run (a pytest parameter)."""

    checker: ComponentChecker
    check: str

    @property
    def id(self) -> str:
        return f"{self.checker.label}-{self.check}"

    @property
    def xfail(self) -> str | None:
        """The reason this check is expected to fail (a known bug of the component), if any."""
        return self.checker.case.xfail.get(self.check)

    def run(self) -> None:
        self.checker.run(self.check)


def check_component(
    component: type[Component] | ComponentEntry,
    params: ParamsSpec | None = None,
    *,
    case: Case | None = None,
    checks: Iterable[str] | None = None,
    registry: Registry | None = None,
) -> list[str]:
    """Run the contract checks of ``component``'s kind on the fixtures; return the checks that ran.

    ``params`` (or a full ``case``) configures the component. Raises AssertionError at the first
    broken check and :class:`SkipComponent` when the component cannot run on the fixtures.
    Upstream components named in the case are looked up in ``registry`` (default: installed plugins).
    """
    if case is None:
        case = Case(params=params or {})
    elif params is not None:
        raise ValueError("give params or case, not both")
    checker = ComponentChecker(component, case, registry=registry)
    chosen = tuple(checks) if checks is not None else checker.checks()
    for check in chosen:
        checker.run(check)
    return list(chosen)


def _check_kind(
    kind: Kind, component: type[Component] | ComponentEntry, params: ParamsSpec | None, **options: Any
) -> list[str]:
    found = component.kind if isinstance(component, type) else getattr(component, "kind", None)
    if found is not kind:
        raise TypeError(f"{component!r} is a {getattr(found, 'value', found)}, not a {kind.value}")
    return check_component(component, params, **options)


def check_data_source(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for a data source: returns_type, counts_declared, same_seed[, sparse_dense]."""
    return _check_kind(Kind.DATA, component, params, **options)


def check_preprocessor(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for a preprocessor: returns_type, writes_declared, same_seed, sparse_dense."""
    return _check_kind(Kind.PREPROCESSOR, component, params, **options)


def check_sampler(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for a sampler: returns_type, same_seed, sparse_dense, backed, save_load."""
    return _check_kind(Kind.SAMPLER, component, params, **options)


def check_tokenizer(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for a tokenizer: returns_type, same_seed, sparse_dense[, streamed], save_load."""
    return _check_kind(Kind.TOKENIZER, component, params, **options)


def check_model(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for a model: returns_type, same_seed, sparse_dense, save_load."""
    return _check_kind(Kind.MODEL, component, params, **options)


def check_extractor(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for an extractor: returns_type, same_seed, sparse_dense, save_load."""
    return _check_kind(Kind.EXTRACTOR, component, params, **options)


def check_evaluator(component: Any, params: ParamsSpec | None = None, **options: Any) -> list[str]:
    """:func:`check_component` for an evaluator: returns_type, same_seed, sparse_dense[, aggregate]."""
    return _check_kind(Kind.EVALUATOR, component, params, **options)


def check_registry(
    registry: Registry | None = None,
    cases: Mapping[str, Case | Iterable[Case]] | None = None,
) -> Iterator[CheckItem]:
    """Every check of every registered component, as :class:`CheckItem` values to run.

    ``cases`` maps ``"kind:name"`` (e.g. ``"data:h5ad"``) to a Case or several; components without
    one run with their default parameters. The fixture files are written once, when first needed.
    """
    from grnx_core.registry import default_registry

    registry = registry if registry is not None else default_registry()
    cases = cases or {}
    files = _SharedFiles()
    for kind in Kind:
        for name, entry in sorted(registry.entries[kind].items()):
            given = cases.get(f"{kind.value}:{name}", Case())
            for case in [given] if isinstance(given, Case) else list(given):
                checker = ComponentChecker(entry, case, registry=registry, files=files)
                for check in checker.checks():
                    yield CheckItem(checker, check)


def pytest_params(
    registry: Registry | None = None,
    cases: Mapping[str, Case | Iterable[Case]] | None = None,
) -> list[Any]:
    """:func:`check_registry` as ``pytest.param`` values with ids; known bugs marked strict xfail."""
    import pytest

    params = []
    for item in check_registry(registry, cases):
        marks = [pytest.mark.xfail(strict=True, reason=item.xfail)] if item.xfail else []
        params.append(pytest.param(item, id=item.id, marks=marks))
    return params
