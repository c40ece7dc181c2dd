"""Built-in tokenizers: registered lazily so that listing them imports nothing heavy."""

from __future__ import annotations

from grnx_core.hookspecs import Register, hookimpl

#: name -> "module:Class"; each module holds one component.
COMPONENTS: dict[str, str] = {
    "rank_value": "grnx_plugins.tokenizers.rank_value:RankValue",
    "expression_scaled": "grnx_plugins.tokenizers.expression_scaled:ExpressionScaled",
    "binned": "grnx_plugins.tokenizers.binned:Binned",
}


@hookimpl
def grnx_register_tokenizers(register: Register) -> None:
    for name, target in COMPONENTS.items():
        register(name, target)
