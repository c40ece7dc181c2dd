"""Hook specifications: how plugins register components and follow a run's lifecycle.

Built-in components register through these same hooks, from the entry points declared in
grnx's own ``pyproject.toml``. A third-party package adds ``[project.entry-points.grnx]`` naming a
module (or object) that implements some of these hooks; after ``pip install`` grnx finds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from grnx_core.context import RunContext

hookspec = pluggy.HookspecMarker("grnx")
hookimpl = pluggy.HookimplMarker("grnx")

#: ``register(component)`` or ``register("name", "package.module:ClassName")``. The second form is
#: lazy: the module is imported only when the component is used or described.
Register = Callable[..., None]


@hookspec
def grnx_register_data_sources(register: Register) -> None:
    """Called once when the registry loads; register data sources (kind ``data``)."""


@hookspec
def grnx_register_preprocessors(register: Register) -> None:
    """Called once when the registry loads; register preprocessors (AnnData in, AnnData out)."""


@hookspec
def grnx_register_samplers(register: Register) -> None:
    """Called once when the registry loads; register cell samplers."""


@hookspec
def grnx_register_tokenizers(register: Register) -> None:
    """Called once when the registry loads; register tokenizers."""


@hookspec
def grnx_register_models(register: Register) -> None:
    """Called once when the registry loads; register models."""


@hookspec
def grnx_register_extractors(register: Register) -> None:
    """Called once when the registry loads; register interaction extractors."""


@hookspec
def grnx_register_evaluators(register: Register) -> None:
    """Called once when the registry loads; register evaluators."""


@hookspec
def grnx_run_started(context: RunContext, run_id: str | None) -> None:
    """Called after the tracked run is opened and before the first stage runs."""


@hookspec
def grnx_stage_finished(context: RunContext, stage: str, cached: bool) -> None:
    """Called after each stage of each leaf run: ``data``, ``preprocess:<index>:<name>``,
    ``sample``, ``tokenize``, ``model``, ``extract:<id>``, ``evaluate:<id>``. ``cached`` is True
    when the output came from the cache (or from another child of the same nested run)."""


@hookspec
def grnx_run_finished(context: RunContext, status: str, error: BaseException | None) -> None:
    """Called when the run ends, with status ``FINISHED`` or ``FAILED`` and the error if any."""


REGISTRATION_HOOKS: dict[str, str] = {
    "data": "grnx_register_data_sources",
    "preprocessor": "grnx_register_preprocessors",
    "sampler": "grnx_register_samplers",
    "tokenizer": "grnx_register_tokenizers",
    "model": "grnx_register_models",
    "extractor": "grnx_register_extractors",
    "evaluator": "grnx_register_evaluators",
}


def hook_signatures() -> dict[str, Any]:
    """The hook specifications by name (used by the documentation test)."""
    import inspect
    import sys

    module = sys.modules[__name__]
    return {
        name: inspect.signature(getattr(module, name)) for name in dir(module) if name.startswith("grnx_")
    }
