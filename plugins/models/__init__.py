"""Built-in models: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "celluformer": "grnx_plugins.models.celluformer:CelluFormer",
    "geneformer": "grnx_plugins.models.geneformer:Geneformer",
    "mlp": "grnx_plugins.models.mlp:MLP",
    "scgpt": "grnx_plugins.models.scgpt:ScGPT",
}


@hookimpl
def grnx_register_models(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
