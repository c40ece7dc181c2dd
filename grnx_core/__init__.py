"""grnx: gene-gene interactions from single-cell data, as tracked, reproducible experiments."""

from __future__ import annotations

from grnx_core.components import (
    AttentionModel,
    Component,
    ComponentParams,
    DataSource,
    Evaluator,
    Extractor,
    Kind,
    Model,
    Preprocessor,
    Sampler,
    Tokenizer,
)
from grnx_core.context import DataRoles, NullLogger, RunContext
from grnx_core.data_types import (
    CellAttention,
    CellSample,
    EvaluationResult,
    GroundTruth,
    Interactions,
    TokenizedCells,
)
from grnx_core.errors import DataError, GrnxError, PluginError, RecipeError
from grnx_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = [
    "AttentionModel",
    "CellAttention",
    "CellSample",
    "Component",
    "ComponentParams",
    "DataError",
    "DataRoles",
    "DataSource",
    "EvaluationResult",
    "Evaluator",
    "Extractor",
    "GroundTruth",
    "GrnxError",
    "Interactions",
    "Kind",
    "Model",
    "NullLogger",
    "PluginError",
    "Preprocessor",
    "RecipeError",
    "RunContext",
    "Sampler",
    "Tokenizer",
    "TokenizedCells",
    "hookimpl",
    "__version__",
]
