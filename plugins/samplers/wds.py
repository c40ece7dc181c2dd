"""Weighted Diversified Sampling (WDS): draw cells with probability falling with their Min-Max density.

Wu et al., "Weighted Diversified Sampling for Efficient Data-Driven Single-Cell Gene-Gene Interaction
Discovery", NeurIPS 2024 (arXiv:2410.15616), Algorithm 1 and Definitions 3.5-3.6; grnx spec:
ALGORITHMS.md section 9.

Min-Max similarity ``J(x, y) = sum_g min(x_g, y_g) / sum_g max(x_g, y_g)`` and density
``K(x) = sum_y J(x, y)`` over all cells (``x`` included). Two streaming passes over the cells:

1. hash every cell with ``R`` 0-bit ICWS hashes (collision probability ~ ``J``), each mapped to one
   of ``B`` buckets, and count ``A[r, h_r(x)] += 1`` in an ``R x B`` sketch (RACE);
2. hash again and read ``w_x = (1/R) sum_r A[r, h_r(x)]``, an estimate of ``K(x)`` (``w_x >= 1``).

Sampling probability ``I(x) = softmax_x(1 / (w_x * temperature))`` (paper Definition 3.5; the
published code instead samples proportionally to ``1 / w_x``, available as
``weighting: inverse``, where ``I(x) ∝ w_x^(-1/temperature)``). Cells are drawn **without**
replacement with Efraimidis-Spirakis keys ``u^(1/I)``, computed in log space.

Differences from the published code, on purpose: the ICWS ``c`` draw is used where the code used
``beta``; cells are drawn without replacement (the code used ``WeightedRandomSampler`` with
replacement); the sketch has ``n_buckets`` columns with a universal hash per row instead of one
column per gene; the data are streamed in row chunks (backed AnnData) rather than held per cell.

Scale of ``temperature``: since ``1/w`` lies in ``(0, 1]``, at ``temperature: 1`` the softmax can
favour the rarest cell over the densest by at most ``e``-fold; lower temperatures (e.g. 0.05)
sharpen the preference for rare cells.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from grnx_core import CellSample, Sampler
from grnx_core.errors import DataError
from grnx_core.progress import progress
from grnx_plugins.samplers._sample_size import SampleSizeParams, sample_size

if TYPE_CHECKING:
    import anndata
    import matplotlib.figure

#: obs columns written by ``sample``.
DENSITY_KEY = "wds_density"
WEIGHT_KEY = "wds_weight"
SAMPLED_KEY = "wds_sampled"


class WeightedDiversifiedSampler(Sampler):
    """Weighted Diversified Sampling over a 0-bit ICWS + RACE sketch of the Min-Max density.

    Reads ``X`` (or ``layers[layer]``) in row chunks, streaming backed AnnData from disk. Writes
    ``obs["wds_density"]`` (estimated Min-Max density ``w``), ``obs["wds_weight"]`` (sampling
    probability ``I``, summing to 1 over all cells) and ``obs["wds_sampled"]`` when ``adata`` is not
    a view (backed AnnData keep obs in memory, so the columns live for the session but are never
    written to the file). The same per-cell arrays are kept as ``density_``, ``probabilities_`` and
    ``indices_`` after ``sample``. The returned :class:`CellSample` has ``weights = I`` of the chosen
    cells (the paper's weighted estimator, Definition 3.3).

    Memory: the hash tables take ``16 * n_genes * n_hashes`` bytes (160 MB for 20,000 genes at
    R = 500), the sketch ``4 * n_hashes * n_buckets``, one chunk of rows, and 16 bytes per cell for
    the outputs; nothing else grows with the number of cells.
    """

    name = "wds"
    description = (
        "Weighted Diversified Sampling: cells drawn without replacement with probability "
        "softmax(1/Min-Max density), density from a two-pass 0-bit ICWS + RACE sketch."
    )
    reference = "https://arxiv.org/abs/2410.15616"
    __version__ = "1"

    class Params(SampleSizeParams):
        n_hashes: int = Field(
            200, ge=1, le=10_000, description="R, hash functions (sketch rows); the paper uses 100-500"
        )
        n_buckets: int = Field(
            4096,
            ge=2,
            description="B, sketch columns; below the number of genes each row maps gene indices to "
            "buckets with its own universal hash (adds about 1/B to every collision probability)",
        )
        temperature: float = Field(
            1.0, gt=0, description="softmax temperature of the inverse density; lower favours rare cells more"
        )
        weighting: Literal["softmax", "inverse"] = Field(
            "softmax",
            description="softmax: I = softmax(1/(w T)) (paper Definition 3.5); inverse: I proportional to "
            "w^(-1/T) (the published code's choice)",
        )
        layer: str | None = Field(
            None, description="expression to hash (non-negative counts or normalised counts); X when null"
        )
        chunk_size: int = Field(2048, ge=1, description="cells read and hashed at a time")

    def sample(self, adata: anndata.AnnData, rng: np.random.Generator) -> CellSample:
        from grnx_plugins.samplers import _wds_hashing as hashing
        from grnx_plugins.samplers._expression_chunks import check_expression_source, iter_row_chunks

        who = "sampler 'wds'"
        n_obs, n_genes = adata.n_obs, adata.n_vars
        n_draw = sample_size(n_obs, self.fraction, self.n_cells, who)
        if n_genes < 1:
            raise DataError(f"{who}: the data has no genes (var is empty); nothing to hash.")
        check_expression_source(adata, self.layer, who)

        hash_rng, key_rng = rng.spawn(2)
        tables = hashing.HashTables.draw(n_genes, self.n_hashes, min(self.n_buckets, n_genes), hash_rng)
        sketch = np.zeros((tables.n_hashes, tables.n_buckets), dtype=np.int32)

        started, started_cpu = time.perf_counter(), time.process_time()
        with progress(total=n_obs, desc=f"{who}: hash cells into the sketch", unit="cell") as bar:
            for _, chunk in iter_row_chunks(adata, self.layer, self.chunk_size, who):
                hashing.count_into_sketch(sketch, hashing.hash_chunk(chunk, tables))
                bar.update(chunk.shape[0])
        pass1, pass1_cpu = time.perf_counter() - started, time.process_time() - started_cpu

        started, started_cpu = time.perf_counter(), time.process_time()
        density = np.empty(n_obs, dtype=np.float64)
        with progress(total=n_obs, desc=f"{who}: query each cell's density", unit="cell") as bar:
            for start, chunk in iter_row_chunks(adata, self.layer, self.chunk_size, who):
                buckets = hashing.hash_chunk(chunk, tables)
                density[start : start + chunk.shape[0]] = hashing.query_sketch(sketch, buckets)
                bar.update(chunk.shape[0])
        pass2, pass2_cpu = time.perf_counter() - started, time.process_time() - started_cpu

        log_probabilities = inclusion_log_probabilities(density, self.temperature, self.weighting)
        indices = efraimidis_spirakis(log_probabilities, n_draw, key_rng)
        probabilities = np.exp(log_probabilities)

        self.density_ = density
        self.probabilities_ = probabilities
        self.indices_ = indices
        obs_written = not adata.is_view
        if obs_written:
            sampled = np.zeros(n_obs, dtype=bool)
            sampled[indices] = True
            adata.obs[DENSITY_KEY] = density
            adata.obs[WEIGHT_KEY] = probabilities
            adata.obs[SAMPLED_KEY] = sampled

        return CellSample(
            indices=indices,
            weights=probabilities[indices],
            n_cells_total=n_obs,
            info={
                "sampler": self.name,
                "n_hashes": tables.n_hashes,
                "n_buckets": tables.n_buckets,
                "temperature": float(self.temperature),
                "weighting": self.weighting,
                "n_cells_sampled": int(indices.size),
                "fraction_sampled": float(indices.size / n_obs),
                "density_min": float(density.min()),
                "density_median": float(np.median(density)),
                "density_max": float(density.max()),
                "weight_max_over_min": float(probabilities.max() / probabilities.min()),
                "effective_sample_size": float(1.0 / np.sum(probabilities**2)),
                "pass1_seconds": round(pass1, 4),
                "pass2_seconds": round(pass2, 4),
                "pass1_cpu_seconds": round(pass1_cpu, 4),
                "pass2_cpu_seconds": round(pass2_cpu, 4),
                "obs_written": int(obs_written),
            },
        )

    def figures(self, adata: anndata.AnnData) -> dict[str, matplotlib.figure.Figure]:
        """Histograms of the sampling probabilities and densities of the last ``sample`` call."""
        if not hasattr(self, "probabilities_"):
            return {}
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 4), layout="constrained")
        left, right = figure.subplots(1, 2)
        # n * I: 1 is the uniform probability, 2 twice as likely as a uniform draw.
        relative = self.probabilities_ * self.probabilities_.size
        bins = np.histogram_bin_edges(relative, bins=60)
        left.hist(relative, bins=bins, color="0.6", label=f"all cells ({relative.size})")
        left.hist(relative[self.indices_], bins=bins, color="C1", label=f"sampled ({self.indices_.size})")
        left.axvline(1.0, color="k", lw=0.8, ls="--")
        left.set(
            xlabel="sampling probability I x n_cells (wds_weight; 1 = uniform)", ylabel="cells", yscale="log"
        )
        left.legend()
        right.hist(self.density_, bins=60, color="C0")
        right.set(xlabel="estimated Min-Max density w (wds_density)", ylabel="cells", yscale="log")
        figure.suptitle(f"WDS: R={self.n_hashes}, {self.weighting}, temperature={self.temperature:g}")
        return {"wds_weights": figure}


def inclusion_log_probabilities(density: np.ndarray, temperature: float, weighting: str) -> np.ndarray:
    """``log I(x)`` from the estimated densities (normalised over all cells)."""
    if weighting == "softmax":
        logits = 1.0 / (density * temperature)
    else:
        logits = -np.log(density) / temperature
    shifted = logits - logits.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


def efraimidis_spirakis(log_probabilities: np.ndarray, n_draw: int, rng: np.random.Generator) -> np.ndarray:
    """Weighted sampling without replacement: the ``n_draw`` largest keys ``u^(1/p)``, sorted indices.

    Efraimidis & Spirakis, Inf. Process. Lett. 2006. ``u^(1/p)`` is largest where
    ``log(-log u) - log p`` is smallest, which is what is compared (no underflow for tiny ``p``).
    """
    keys = np.log(rng.standard_exponential(log_probabilities.size)) - log_probabilities
    if n_draw >= keys.size:
        return np.arange(keys.size, dtype=np.int64)
    chosen = np.argpartition(keys, n_draw - 1)[:n_draw]
    return np.sort(chosen).astype(np.int64)
