"""Component contracts: the base class of every plugin kind and its parameter model.

A component class declares ``name``, a one-line ``description``, a ``reference`` (paper DOI or
URL) and a pydantic ``Params`` model (``extra="forbid"``), the single source of its parameter
schema, defaults and documentation. Its constructor takes exactly the ``Params`` fields as
keyword arguments and only stores them (scikit-learn style); work happens in the kind's methods.
Fitted state ends in ``_``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from pathlib import Path

    import anndata
    import matplotlib.figure
    import numpy as np
    import pandas as pd

    from grnx_core.context import RunContext
    from grnx_core.data_types import CellAttention, CellSample, EvaluationResult, Interactions, TokenizedCells


class Kind(str, Enum):
    """The plugin kinds, in the order the runner uses them."""

    DATA = "data"
    PREPROCESSOR = "preprocessor"
    SAMPLER = "sampler"
    TOKENIZER = "tokenizer"
    MODEL = "model"
    EXTRACTOR = "extractor"
    EVALUATOR = "evaluator"

    @property
    def plural(self) -> str:
        return {"data": "data sources"}.get(self.value, self.value + "s")


class ComponentParams(BaseModel):
    """Base of every component's ``Params``: unknown keys are errors, defaults are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


#: Data roles a ``Params`` field can default to (see :func:`role_field`).
ROLES = ("label_key", "donor_key", "batch_key", "cell_type_key")

#: What a stage can hand a component. A component lists what it reads in ``needs``; the recipe
#: validator reports a need no earlier stage meets, and the executor loads only what is needed (a
#: fully cached evaluator never reads the expression matrix).
#: ``model_inputs`` is what the recipe's model reads: ``tokens`` for token models, else ``data``.
NEEDS = ("data", "cells", "tokens", "tokenizer", "model", "model_inputs", "ground_truth", "interactions")


def role_field(role: str, description: str) -> Any:
    """A ``Params`` field that defaults to the recipe's data role (``data.<role>``) when left None.

    The recipe validator fills it in, so ``grnx show`` and the tracked params carry the real value.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return Field(
        None, description=f"{description}; data.{role} when None", json_schema_extra={"grnx_role": role}
    )


def seed_field(description: str = "random seed") -> Any:
    """An optional ``seed`` field: None derives it from the recipe seed and the step's name."""
    return Field(
        None, ge=0, le=2**32 - 1, description=f"{description}; derived from the recipe seed when None"
    )


class Component:
    """Common base of all component kinds."""

    kind: ClassVar[Kind]
    name: ClassVar[str]
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Params: ClassVar[type[ComponentParams]] = ComponentParams

    def __init__(self, **params: Any) -> None:
        validated = self.Params(**params)
        for field in type(validated).model_fields:
            setattr(self, field, getattr(validated, field))

    def input_files(self) -> list[Path]:
        """Files this component reads, as named by its params: validated to exist before any stage
        runs, and their content digests key the cache.

        By default, the files of every param value that declares its own ``input_files()`` (e.g. a
        ground-truth spec); components that read files through plain string params override it.
        """
        files: list[Path] = []
        for field in self.Params.model_fields:
            declared = getattr(getattr(self, field, None), "input_files", None)
            if callable(declared):
                files.extend(declared())
        return files

    @classmethod
    def from_params(cls, params: ComponentParams) -> Component:
        """Build the component from an already validated ``Params`` instance."""
        return cls(**{field: getattr(params, field) for field in type(params).model_fields})

    @classmethod
    def version(cls) -> str:
        """Version string recorded with cached outputs and tags.

        Cache keys also hold a digest of the component's source (see ``grnx_core.identity``), so
        an edit invalidates cached outputs without a bump; bump it to mark a change of results.
        """
        return getattr(cls, "__version__", "1")

    def get_params(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in self.Params.model_fields}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class DataSource(Component):
    """Loads an AnnData. Raw integer counts are kept in ``.layers["counts"]``.

    A data source that simulates or ships a known network returns it from ``ground_truth()``, and
    every network it knows, by name, from ``ground_truths()``.
    """

    kind = Kind.DATA

    def load(self) -> anndata.AnnData:
        raise NotImplementedError

    def ground_truth(self) -> pd.DataFrame | None:
        """Edges known to be true for this data (columns source, target[, sign]), if any."""
        return None

    def ground_truth_directed(self) -> bool:
        return True

    def ground_truths(self) -> dict[str, pd.DataFrame]:
        """Every network this source ships, by name (synthetic: planted, disease, state); {} when none.

        Evaluators ask for one by name (``ground_truth: {source: data, edges: disease}``), so one run
        can score a difference extractor against the disease edges and another against the network.
        """
        return {}

    def obs_columns(self) -> list[str] | None:
        """The obs columns ``load`` will give, when the source can tell without loading the
        matrix (a file header, a fixed simulation); None when it cannot. Validation uses it to
        refuse a data role that names no column before any stage runs."""
        return None


class Preprocessor(Component):
    """AnnData in, AnnData out; writes only the keys listed in ``writes``."""

    kind = Kind.PREPROCESSOR
    writes: ClassVar[tuple[str, ...]] = ()

    def __call__(self, adata: anndata.AnnData) -> anndata.AnnData:
        raise NotImplementedError

    def figures(self, adata: anndata.AnnData) -> dict[str, matplotlib.figure.Figure]:
        """Figures to log after the step ran (e.g. a UMAP coloured by batch)."""
        return {}


class Sampler(Component):
    """Chooses the cells later stages see, with a weight per chosen cell."""

    kind = Kind.SAMPLER

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        raise NotImplementedError


class Tokenizer(Component):
    """Turns cells into token sequences for a model."""

    kind = Kind.TOKENIZER

    def fit(self, adata: anndata.AnnData) -> Tokenizer:
        return self

    def transform(self, adata: anndata.AnnData, obs_columns: list[str] | None = None) -> TokenizedCells:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write the params and fitted state (attributes ending in ``_``) to the folder ``path``.

        State is stored without pickles: JSON for plain values, ``.npy`` for arrays, lists for
        pandas indexes. A tokenizer with other fitted state overrides ``save`` and ``load``.
        """
        from grnx_core.state import save_state

        save_state(self, path)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """The fitted tokenizer that ``save`` wrote."""
        from grnx_core.state import load_state

        loaded = load_state(cls, path)
        assert isinstance(loaded, Tokenizer)
        return loaded


class Model(Component):
    """A trainable model. ``fit`` reads tokens (or AnnData) and the train settings from the context."""

    kind = Kind.MODEL
    #: "tokens" when the model consumes TokenizedCells, "adata" when it reads expression directly.
    input_kind: ClassVar[str] = "tokens"

    def fit(self, context: RunContext) -> Model:
        raise NotImplementedError

    def predict(self, inputs: Any) -> np.ndarray:
        raise NotImplementedError

    def embed(self, inputs: Any) -> np.ndarray:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        raise NotImplementedError

    @classmethod
    def load(cls, path: Path) -> Model:
        raise NotImplementedError

    def use_device(self, device: str) -> None:
        """Move a loaded model to ``train.device`` ("auto", "cpu", "cuda") for inference: ``load``
        reads weights onto the CPU. Models without a device (the default) ignore it."""


@runtime_checkable
class AttentionModel(Protocol):
    """A fitted model that yields per-cell attention maps (celluformer, geneformer, scgpt).

    Extractors reach models only through contracts like this one, never through a plugin's
    internals; ``token_info_["special_ids"]`` names the token ids that are not genes.
    """

    def attention(
        self,
        tokens: TokenizedCells,
        *,
        cells: np.ndarray | None = None,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        batch_size: int = 8,
        max_length: int | None = None,
        include_special: bool = False,
    ) -> Iterator[CellAttention]: ...


@runtime_checkable
class GeneEmbeddingModel(Protocol):
    """A fitted token model that exposes its genes' embeddings (celluformer, geneformer, scgpt).

    ``input_gene_embeddings`` gives rows of the input gene-embedding table for token ids, (n, d)
    float64, each model saying what a row is. ``contextual_gene_embeddings`` yields, per cell,
    ``(cell, token_ids, hidden)``: hidden state ``layer`` (0 = the embedding layer's output, k =
    the output of block k, negative from the end) at each of the cell's gene tokens, (m, d),
    special tokens and padding dropped. ``hidden_state_batches`` yields whole batches instead,
    ``(cells, hidden, keep)``: torch tensors (B, L, d) float32 and (B, L) bool (True on gene tokens)
    on the model's device, for callers that embed many token batches (in silico perturbation).
    """

    def input_gene_embeddings(self, tokens: TokenizedCells, token_ids: np.ndarray) -> np.ndarray: ...

    def hidden_state_batches(
        self,
        tokens: TokenizedCells,
        *,
        cells: np.ndarray | None = None,
        layer: int = -1,
        batch_size: int = 8,
        autocast_dtype: str | None = None,
    ) -> Iterator[tuple[np.ndarray, Any, Any]]: ...

    def contextual_gene_embeddings(
        self,
        tokens: TokenizedCells,
        *,
        cells: np.ndarray | None = None,
        layer: int = -1,
        batch_size: int = 8,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]: ...


class Extractor(Component):
    """Ranks gene pairs from the context (data, sample, model).

    ``needs`` lists what ``extract`` reads (names from ``NEEDS``); None means whatever the recipe
    provides. The cache key of the step chains only the keys of what it needs, so a Pearson
    extractor is not recomputed when the model changes.
    """

    kind = Kind.EXTRACTOR
    needs: ClassVar[tuple[str, ...] | None] = None
    #: what the orientation of the output means: ``UNDIRECTED`` (each pair once, no direction
    #: claimed) or the meaning of source -> target, e.g. ``"regulator -> target"``. Extractors
    #: whose orientation depends on their params override ``output_direction``.
    direction: ClassVar[str] = "undirected"

    def output_direction(self) -> str:
        """``"undirected"``, or what source -> target means for this extractor as configured."""
        return self.direction

    def extract(self, context: RunContext) -> Interactions:
        raise NotImplementedError


class Evaluator(Component):
    """Scores the run: interactions against a ground truth, or a model's predictions.

    With a repeated sampler, an evaluator may also define
    ``aggregate(repeat_results: list[EvaluationResult], reference: EvaluationResult | None)
    -> dict[str, float]``, called on the parent run with each repeat's result (and, when the class
    sets ``needs_reference = True``, the result on all cells without the sampler).
    """

    kind = Kind.EVALUATOR
    #: metric name -> whether a higher value is better. Metric names may carry prefixes such as the
    #: extractor id and universe (``pearson/truth_genes/auprc``) or a suffix such as a class
    #: (``f1/B cell``): the entry for ``auprc`` or ``f1`` covers them (see ``metric_direction``).
    higher_is_better: ClassVar[dict[str, bool]] = {}
    #: metrics that describe the run rather than score it, so have no direction: counts
    #: (``n_cells``, ``gt_edges``) and random baselines (``auprc_random``). Matched like the keys
    #: of ``higher_is_better``; every metric an evaluator returns is declared in one of the two.
    informational: ClassVar[frozenset[str]] = frozenset()
    #: ask the runner for a reference run on all cells when the sampler repeats; a recipe with such
    #: an evaluator and no sampler is refused (there would be no repeats to compare).
    needs_reference: ClassVar[bool] = False
    #: what ``evaluate`` reads (names from ``NEEDS``); None means whatever the recipe provides.
    needs: ClassVar[tuple[str, ...] | None] = None
    #: the cell set evaluated when the recipe gives no ``cells``; None: the sample, else all cells.
    default_cells: ClassVar[str | None] = None

    @classmethod
    def _declaration(cls, metric: str) -> str | None:
        """The longest sub-path of ``metric`` declared in ``higher_is_better`` or ``informational``."""
        parts = metric.split("/")
        for length in range(len(parts), 0, -1):
            for start in range(0, len(parts) - length + 1):
                key = "/".join(parts[start : start + length])
                if key in cls.higher_is_better or key in cls.informational:
                    return key
        return None

    @classmethod
    def metric_direction(cls, metric: str) -> bool | None:
        """Whether higher is better for ``metric``, matching its longest declared sub-path; None for
        an informational metric and for one declared nowhere (tell them apart with ``declares``)."""
        key = cls._declaration(metric)
        return cls.higher_is_better.get(key) if key is not None else None

    @classmethod
    def declares(cls, metric: str) -> bool:
        """Whether ``metric`` is declared, with a direction or as informational."""
        return cls._declaration(metric) is not None

    def evaluate(self, context: RunContext) -> EvaluationResult:
        raise NotImplementedError


KIND_BASES: dict[Kind, type[Component]] = {
    Kind.DATA: DataSource,
    Kind.PREPROCESSOR: Preprocessor,
    Kind.SAMPLER: Sampler,
    Kind.TOKENIZER: Tokenizer,
    Kind.MODEL: Model,
    Kind.EXTRACTOR: Extractor,
    Kind.EVALUATOR: Evaluator,
}


def constructor_fields(cls: type[Component]) -> set[str] | None:
    """Keyword names an explicit ``__init__`` takes, or None when it accepts ``**params``."""
    signature = inspect.signature(cls.__init__)
    names = set()
    for parameter in list(signature.parameters.values())[1:]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        names.add(parameter.name)
    return names
