"""Built-in data sources: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "scanpy_builtin": "grnx_plugins.data.scanpy_builtin:ScanpyBuiltin",
}


@hookimpl
def grnx_register_data_sources(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
