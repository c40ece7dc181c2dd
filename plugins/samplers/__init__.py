"""Built-in samplers: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "wds": "grnx_plugins.samplers.wds:WeightedDiversifiedSampler",
    "uniform": "grnx_plugins.samplers.uniform:UniformSampler",
    "stratified": "grnx_plugins.samplers.stratified:StratifiedSampler",
    "geosketch": "grnx_plugins.samplers.geosketch:GeometricSketchSampler",
    "scsampler": "grnx_plugins.samplers.scsampler:ScSampler",
    "kernel_herding": "grnx_plugins.samplers.kernel_herding:KernelHerdingSampler",
}


@hookimpl
def grnx_register_samplers(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
