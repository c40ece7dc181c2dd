"""Weighted Diversified Sampling (WDS): draw cells with probability falling with their Min-Max density.

Wu et al., "Weighted Diversified Sampling for Efficient Data-Driven Single-Cell Gene-Gene Interaction
Discovery", NeurIPS 2024 (arXiv:2410.15616), Algorithm 1 and Definitions 3.5-3.6; method page:
docs/methods/samplers.md#wds.

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

Settings. The default is the paper's definition, and it samples almost uniformly: ``K`` sums over
all cells, so ``1/K`` is tiny and its softmax flat (measured in grnx issue 17: max/min probability
1.05 on Kang 2018, effective sample size = n), while temperatures low enough to matter put the
mass on a few outliers. Three settings make the density discriminative and the weights usable
(docs/methods/samplers.md#wds):

- ``kernel_power: p`` (sharpened kernel): each sketch row concatenates ``p`` hashes, so two cells
  collide with probability ``J^p`` and the sketch estimates ``K_p(x) = sum_y J(x, y)^p`` (plus
  ``n/B`` from distinct tuples sharing a bucket: keep ``n_buckets`` well above ``n_cells``).
  ``J^p`` is a monotone ``phi(J)``, which the paper's Definition 3.2 allows. Far cells then stop
  adding to a cell's density, which counts its near neighbours instead of everything.
- ``layer: counts`` (density on counts): hash raw counts instead of X. The Min-Max sketch ranks
  cells by exact density far better on counts (Spearman 0.91 / 0.95 / 0.97 at R = 100 / 200 / 500
  on Kang 2018) than on log1p-normalised values (0.64 / 0.77 / 0.87).
- ``weighting: inverse_power`` with ``power: a``: ``I(x) ∝ w_x^(-a)``, normalised over all cells
  (``a = 1``: inverse density; ``weighting: inverse`` with ``temperature: T`` is the same family,
  ``a = 1/T``).

Every sample reports its effective sample size ``1 / sum(I^2)`` and max/min probability in
``info``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

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

    Memory: the hash tables take ``16 * n_genes * n_hashes * kernel_power`` bytes (160 MB for
    20,000 genes at R = 500, p = 1), the sketch ``4 * n_hashes * n_buckets``, one chunk of rows,
    and 16 bytes per cell for the outputs; nothing else grows with the number of cells.
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
            "buckets with its own universal hash (adds about 1/B to every collision probability); with "
            "kernel_power > 1 every row hashes its tuple into B buckets and the density gains n_cells/B, so "
            "use B well above n_cells",
        )
        kernel_power: int = Field(
            1,
            ge=1,
            le=16,
            description="p, hashes concatenated per sketch row: cells collide with probability J^p, a "
            "sharper kernel (1: the paper's kernel J); costs p times the hashing and table memory",
        )
        temperature: float = Field(
            1.0, gt=0, description="softmax temperature of the inverse density; lower favours rare cells more"
        )
        weighting: Literal["softmax", "inverse", "inverse_power"] = Field(
            "softmax",
            description="softmax: I = softmax(1/(w T)) (paper Definition 3.5); inverse: I proportional to "
            "w^(-1/T) (the published code's choice); inverse_power: I proportional to w^(-power)",
        )
        power: float | None = Field(
            None,
            gt=0,
            le=100,
            description="a in I proportional to w^(-a); required by weighting: inverse_power, refused otherwise",
        )
        layer: str | None = Field(
            None,
            description="expression to hash, non-negative: 'counts' hashes the raw counts (the density "
            "ranks cells far better on counts than on log1p values); X when null",
        )
        chunk_size: int = Field(2048, ge=1, description="cells read and hashed at a time")

        @model_validator(mode="after")
        def _power_goes_with_inverse_power(self) -> WeightedDiversifiedSampler.Params:
            if self.weighting == "inverse_power":
                if self.power is None:
                    raise ValueError("weighting: inverse_power needs power (a in I proportional to w^(-a))")
                if self.temperature != 1.0:
                    raise ValueError(
                        f"weighting: inverse_power takes its sharpness from power, not temperature "
                        f"(got temperature {self.temperature:g}); leave temperature at 1"
                    )
            elif self.power is not None:
                raise ValueError(
                    f"power is used only by weighting: inverse_power (weighting is {self.weighting!r}); "
                    f"remove power or set weighting: inverse_power"
                )
            return self

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
        power = self.kernel_power
        if power == 1:
            tables = hashing.HashTables.draw(n_genes, self.n_hashes, min(self.n_buckets, n_genes), hash_rng)
            n_buckets = tables.n_buckets

            def hash_cells(chunk):
                return hashing.hash_chunk(chunk, tables)
        else:
            # Gene indices stay unhashed per hash; each row's tuple of p of them is hashed to B buckets.
            tables = hashing.HashTables.draw(n_genes, self.n_hashes * power, n_genes, hash_rng)
            tuples = hashing.TupleBuckets.draw(self.n_hashes, power, self.n_buckets, hash_rng)
            n_buckets = tuples.n_buckets

            def hash_cells(chunk):
                return tuples.buckets(hashing.minhash_genes(chunk, tables))

        sketch = np.zeros((self.n_hashes, n_buckets), dtype=np.int32)

        started, started_cpu = time.perf_counter(), time.process_time()
        with progress(total=n_obs, desc=f"{who}: hash cells into the sketch", unit="cell") as bar:
            for _, chunk in iter_row_chunks(adata, self.layer, self.chunk_size, who):
                hashing.count_into_sketch(sketch, hash_cells(chunk))
                bar.update(chunk.shape[0])
        pass1, pass1_cpu = time.perf_counter() - started, time.process_time() - started_cpu

        started, started_cpu = time.perf_counter(), time.process_time()
        density = np.empty(n_obs, dtype=np.float64)
        with progress(total=n_obs, desc=f"{who}: query each cell's density", unit="cell") as bar:
            for start, chunk in iter_row_chunks(adata, self.layer, self.chunk_size, who):
                buckets = hash_cells(chunk)
                density[start : start + chunk.shape[0]] = hashing.query_sketch(sketch, buckets)
                bar.update(chunk.shape[0])
        pass2, pass2_cpu = time.perf_counter() - started, time.process_time() - started_cpu

        log_probabilities = inclusion_log_probabilities(density, self.temperature, self.weighting, self.power)
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

        info: dict[str, float | int | str] = {
            "sampler": self.name,
            "n_hashes": self.n_hashes,
            "n_buckets": n_buckets,
            "kernel_power": power,
            "temperature": float(self.temperature),
            "weighting": self.weighting,
        }
        if self.power is not None:
            info["power"] = float(self.power)
        return CellSample(
            indices=indices,
            weights=probabilities[indices],
            n_cells_total=n_obs,
            info={
                **info,
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
        sharpness = f"power={self.power:g}" if self.power is not None else f"temperature={self.temperature:g}"
        figure.suptitle(f"WDS: R={self.n_hashes}, p={self.kernel_power}, {self.weighting}, {sharpness}")
        return {"wds_weights": figure}


def inclusion_log_probabilities(
    density: np.ndarray, temperature: float, weighting: str, power: float | None = None
) -> np.ndarray:
    """``log I(x)`` from the estimated densities (normalised over all cells)."""
    if weighting == "softmax":
        logits = 1.0 / (density * temperature)
    elif weighting == "inverse_power":
        assert power is not None
        logits = -power * np.log(density)
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
