"""Built-in extractors: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "attention": "grnx_plugins.extractors.attention:AttentionExtractor",
    "cscore": "grnx_plugins.extractors.cscore:CscoreExtractor",
    "embedding_similarity": "grnx_plugins.extractors.embedding_similarity:EmbeddingSimilarityExtractor",
    "genie3": "grnx_plugins.extractors.genie3:GENIE3Extractor",
    "grnboost2": "grnx_plugins.extractors.grnboost2:GRNBoost2Extractor",
    "insilico_perturbation": "grnx_plugins.extractors.insilico_perturbation:InsilicoPerturbationExtractor",
    "nid": "grnx_plugins.extractors.nid:NIDExtractor",
    "pearson": "grnx_plugins.extractors.pearson:PearsonExtractor",
    "spearman": "grnx_plugins.extractors.spearman:SpearmanExtractor",
}


@hookimpl
def grnx_register_extractors(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
