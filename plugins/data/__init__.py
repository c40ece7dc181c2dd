"""Built-in data sources: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "scanpy_builtin": "grnx_plugins.data.scanpy_builtin:ScanpyBuiltin",
    "h5ad": "grnx_plugins.data.h5ad:H5ad",
    "10x_mtx": "grnx_plugins.data.tenx_mtx:TenxMtx",
    "csv": "grnx_plugins.data.csv_matrix:CsvMatrix",
    "synthetic": "grnx_plugins.data.synthetic:Synthetic",
    "rosmap": "grnx_plugins.data.rosmap:Rosmap",
}


@hookimpl
def grnx_register_data_sources(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
