"""GRNBoost2: regulator -> target links from per-target stochastic gradient boosting (arboreto)."""

from __future__ import annotations

from pydantic import Field

from grnx_plugins.extractors._tree_regressions import (
    Regressor,
    TreeRegressionExtractor,
    TreeRegressionParams,
    arboreto_profile,
)


class GRNBoost2Extractor(TreeRegressionExtractor):
    """GRNBoost2 (Moerman et al., Bioinformatics 2019; docs/methods/extractors.md#grnboost2-and-genie3).

    Each target gene's expression is fitted by scikit-learn's ``GradientBoostingRegressor`` with
    arboreto's ``SGBM_KWARGS`` (learning rate 0.01, at most 5,000 trees, 10% of the regulators per
    split, 90% of the cells per tree) and arboreto's early stopping: boosting stops once the mean
    out-of-bag improvement over the last ``early_stop_window`` trees turns negative. The score of
    ``regulator -> target`` is the regressor's feature importance times the number of trees kept
    (arboreto's ``to_feature_importances``), so links of targets that kept learning rank higher.
    Links of importance 0 are dropped, as arboreto drops them. Reads ``X`` (or ``layer``) of the
    sample's cells; see ``grnx_plugins.extractors._tree_regressions`` for the universe, the TF list,
    the per-target seeds and the Ray execution (``execution.num_workers``, ``execution.ray_address``).
    """

    name = "grnboost2"
    description = (
        "Directed regulator -> target links from per-target gradient boosting (arboreto's GRNBoost2)."
    )
    reference = "https://doi.org/10.1093/bioinformatics/bty916"
    method = "grnboost2"

    class Params(TreeRegressionParams):
        early_stop_window: int = Field(
            25,
            ge=1,
            description="stop boosting when the mean out-of-bag improvement of the last this many "
            "trees is negative (arboreto's EARLY_STOP_WINDOW_LENGTH, 25)",
        )

    early_stop_window: int

    def regressor(self) -> Regressor:
        return arboreto_profile(self.method, self.n_estimators, early_stop_window=self.early_stop_window)
