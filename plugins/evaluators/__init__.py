"""Built-in evaluators: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "nes": "grnx_plugins.evaluators.nes:NesEvaluator",
    "nes_stability": "grnx_plugins.evaluators.nes_stability:NesStabilityEvaluator",
    "auprc": "grnx_plugins.evaluators.auprc:AuprcEvaluator",
    "classification": "grnx_plugins.evaluators.classification:ClassificationEvaluator",
    "sampler_diversity": "grnx_plugins.evaluators.sampler_diversity:SamplerDiversityEvaluator",
}


@hookimpl
def grnx_register_evaluators(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
