"""NES stability across repeated samples: mean NES and MSE of NES against the full-data run."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from grnx_core import EvaluationResult
from grnx_plugins.evaluators.nes import NesEvaluator, _extractors_in, _values


class NesStabilityEvaluator(NesEvaluator):
    """The WDS paper's Table 3 protocol (Wu et al., NeurIPS 2024): NES over repeated samples.

    Each repeat (a nested run with its own sampler seed) computes NES exactly as ``nes``. On the
    parent run, ``aggregate`` reports per extractor the mean NES over repeats and the mean squared
    error of the repeats' NES against the reference run (the same recipe on the full data, no
    sampler), which the runner computes because ``needs_reference`` is set:
    ``nes_mse = mean_r (NES_r - NES_full)^2``. Keep the permutation seed fixed (the default) so the
    Monte-Carlo error of the null is shared by the repeats and the reference. A recipe without a
    sampler is refused at validation (``needs_reference``): it would only report plain ``nes``.
    """

    name = "nes_stability"
    description = "Mean NES over repeated samples and MSE of NES against the full-data run (WDS Table 3)."
    reference = "https://arxiv.org/abs/2410.15616"

    higher_is_better: ClassVar[dict[str, bool]] = {
        **NesEvaluator.higher_is_better,
        "nes_mean": True,
        "nes_std": False,
        "es_mean": True,
        "nes_mse": False,
        "es_mse": False,
    }
    #: the number of repeats, and the reference run's NES the repeats are compared with
    informational: ClassVar[frozenset[str]] = NesEvaluator.informational | {"n_repeats", "nes_reference"}
    needs_reference: ClassVar[bool] = True

    def aggregate(
        self, repeat_results: list[EvaluationResult], reference: EvaluationResult | None
    ) -> dict[str, float]:
        """Per extractor: mean and spread of NES over repeats; MSE against the reference run if given."""
        repeat_metrics = [result.metrics for result in repeat_results]
        reference_metrics = reference.metrics if reference is not None else None
        out: dict[str, float] = {}
        for extractor in _extractors_in(repeat_metrics):
            nes, es = _values(repeat_metrics, f"{extractor}/nes"), _values(repeat_metrics, f"{extractor}/es")
            if not len(nes):
                continue
            out[f"{extractor}/nes_mean"] = float(np.mean(nes))
            out[f"{extractor}/nes_std"] = float(np.std(nes, ddof=1)) if len(nes) > 1 else 0.0
            out[f"{extractor}/es_mean"] = float(np.mean(es))
            out[f"{extractor}/n_repeats"] = float(len(nes))
        if not reference_metrics:
            return out
        for extractor in _extractors_in(repeat_metrics):
            for metric in ("nes", "es"):
                key = f"{extractor}/{metric}"
                values = _values(repeat_metrics, key)
                if key not in reference_metrics or not len(values):
                    continue
                reference = float(reference_metrics[key])
                out[f"{extractor}/{metric}_mse"] = float(np.mean((values - reference) ** 2))
                if metric == "nes":
                    out[f"{extractor}/nes_reference"] = reference
        return out
