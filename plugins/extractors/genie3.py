"""GENIE3: regulator -> target links from per-target random forests (arboreto)."""

from __future__ import annotations

from grnx_plugins.extractors._tree_regressions import TreeRegressionExtractor, TreeRegressionParams


class GENIE3Extractor(TreeRegressionExtractor):
    """GENIE3 (Huynh-Thu et al., PLoS ONE 2010; docs/methods/extractors.md#grnboost2-and-genie3), as arboreto runs it.

    Each target gene's expression is fitted by scikit-learn's ``RandomForestRegressor`` with
    arboreto's ``RF_KWARGS`` (1,000 trees, sqrt of the regulators per split); the score of
    ``regulator -> target`` is the forest's impurity importance (which sums to 1 per target). Links
    of importance 0 are dropped, as arboreto drops them. A forest costs about ten times a GRNBoost2
    fit; ``n_estimators`` trades accuracy for time. Reads ``X`` (or ``layer``) of the sample's
    cells; see ``grnx_plugins.extractors._tree_regressions`` for the universe, the TF list, the
    per-target seeds and the Ray execution.
    """

    name = "genie3"
    description = "Directed regulator -> target links from per-target random forests (arboreto's GENIE3)."
    reference = "https://doi.org/10.1371/journal.pone.0012776"
    method = "genie3"

    class Params(TreeRegressionParams):
        pass
