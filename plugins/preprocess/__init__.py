"""Built-in preprocessors: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "map_gene_ids": "grnx_plugins.preprocess.map_gene_ids:MapGeneIds",
    "scrublet": "grnx_plugins.preprocess.scrublet:Scrublet",
    "qc_filter": "grnx_plugins.preprocess.qc_filter:QcFilter",
    "normalize_total": "grnx_plugins.preprocess.normalize_total:NormalizeTotal",
    "log1p": "grnx_plugins.preprocess.log1p:Log1p",
    "highly_variable_genes": "grnx_plugins.preprocess.highly_variable_genes:HighlyVariableGenes",
    "regress_out": "grnx_plugins.preprocess.regress_out:RegressOut",
    "scale": "grnx_plugins.preprocess.scale:Scale",
    "pca": "grnx_plugins.preprocess.pca:Pca",
    "neighbors": "grnx_plugins.preprocess.neighbors:Neighbors",
    "leiden": "grnx_plugins.preprocess.leiden:Leiden",
    "umap": "grnx_plugins.preprocess.umap:Umap",
    "keep_annotated": "grnx_plugins.preprocess.keep_annotated:KeepAnnotated",
    "split": "grnx_plugins.preprocess.split:Split",
    "balance": "grnx_plugins.preprocess.balance:Balance",
    "select_cells": "grnx_plugins.preprocess.select_cells:SelectCells",
}


@hookimpl
def grnx_register_preprocessors(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
