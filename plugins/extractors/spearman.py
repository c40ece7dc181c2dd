"""Spearman co-expression: Pearson correlation of per-gene ranks."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.stats import rankdata

from grnx_plugins.extractors.pearson import PearsonExtractor


class SpearmanExtractor(PearsonExtractor):
    name = "spearman"
    description = "Gene pairs ranked by Spearman co-expression, or by its difference between two groups."
    reference = "https://doi.org/10.1038/s41592-019-0690-6"

    def transform_values(self, matrix):
        # Average ranks within each gene, ties (including all zeros) sharing one rank.
        dense = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
        return rankdata(dense, axis=0, method="average")
