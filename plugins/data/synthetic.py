"""Simulated counts from a planted signed regulatory network, with a disease label that rewires edges.

The generative model, per cell ``c`` and gene ``g`` (all of it vectorised over chunks of cells):

* The first ``n_regulators`` genes are regulators; the first quarter of them (at least one) are
  *masters* with no parents. Every other gene gets ``1 + Poisson(mean_in_degree - 1)`` parents
  drawn among the regulators that precede it, so the graph is a DAG in gene order. Each edge has a
  weight ``w = sign * U(0.6, 1.2) / sqrt(in-degree)``, negative with probability
  ``fraction_negative``.
* Latent activity ``a``: masters ``a = m[group, g] + d[donor, g] + e``; every other gene
  ``a = sum_parents w_pg * tanh(a_p) + e``, computed level by level in topological order, with
  noise ``e ~ N(0, noise^2)``, cell-group means ``m ~ N(0, group_effect^2)`` and donor shifts
  ``d ~ N(0, donor_effect^2)``. ``tanh`` makes the response saturating (nonlinear) but monotone,
  so every edge leaves a signed co-expression trace.
* Counts: ``x ~ NB(mean = s_c * p_g * b[batch, g] * exp(effect_size * a), size = dispersion)``
  drawn as a gamma-Poisson mixture, with depth ``s_c ~ mean_depth * LogNormal(0, depth_sd)``,
  baseline proportions ``p_g`` (log-normal, summing to 1) and batch factors
  ``b ~ LogNormal(0, batch_effect)``.
* Disease: donors are disease or control (``disease_fraction`` of them disease). In disease cells,
  ``n_rewired`` planted edges flip sign and ``n_gained`` new edges (regulator -> later gene)
  switch on. Those disease-specific edges are in ``uns["synthetic"]["disease_edges"]``.

Options (issue 17), all off by default; off, the data is bit-for-bit what it was before them (their
draws come from their own seeded streams):

* ``n_de_genes``: a disease mean-shift module. That many genes, drawn among the non-regulators that
  are no end of a disease or state edge, have their NB mean multiplied by ``de_fold_change`` in
  disease cells (on the count scale, so no child moves): marker genes disjoint from the rewired
  pairs. Listed in ``uns["synthetic"]["de_genes"]`` (a gene list is no edge ground truth).
* ``rare_state_fraction``: exactly ``round(fraction * n_cells)`` cells, drawn uniformly, are in a
  rare state (obs ``state``: rare / common): their master activity is shifted by
  ``N(0, state_effect^2)`` per master (so the state is a region of expression space) and
  ``n_state_edges`` extra edges (regulator -> later gene, absent from the control and disease
  graphs) switch on in them, control or disease alike; in ``uns["synthetic"]["state_edges"]``.
* ``depth: requested``: each cell's NB means are scaled so their sum, the expected library size,
  equals its drawn depth (mean ``mean_depth``). The default, ``approximate``, divides the depth by
  ``exp(effect_size^2 (1 + noise^2) / 2)``, which undershoots (about 4,000 realised UMIs for
  5,000 requested at the defaults).
* ``donor_design: balanced``: a design for donor-level splits (use ``n_donors`` >= 20). Exactly
  ``round(disease_fraction * n_donors)`` donors are disease (half when ``disease_fraction`` is 0.5,
  which then needs an even ``n_donors``), drawn at random; every donor has ``n_cells // n_donors``
  cells, the remainder going one each to donors alternating disease and control, so the
  conditions' cell counts differ by at most one; the j-th disease donor and the j-th control
  donor are in batch ``j % n_batches``, so each batch holds both conditions (equally at 0.5).
  Settings that leave a condition with fewer than 2 donors, a batch without one condition or a
  donor without cells are refused. The default, ``random``, draws donor sizes from a
  Dirichlet(5) and batches by donor index, as before; the balanced assignment has its own stream,
  so the network, cell groups, depths and per-donor and per-batch effects are those of the
  default with the same ``n_donors``; only which cells belong to which donor changes.
* ``interaction_label``: obs ``interaction_label`` is ``same`` where the latent noise terms
  (innovations) of one planted parent and child have the same sign, else ``opposite``: the sign of
  their product. Each innovation alone is symmetric and independent of the other, of the cell
  group and of the disease, so the label shifts the mean of no gene (a linear model on the genes
  stays at the 50% majority rate) while the parent x child product predicts it. The edge is the
  control edge untouched by any option whose genes have the largest smaller baseline share
  (``uns["synthetic"]["interaction_edge"]``).

``ground_truth()`` returns the control network (source, target, sign; ``ground_truth_edges:
planted``), the disease-specific edges (``disease``; ``sign`` is the disease sign) or the rare
state's edges (``state``); ``ground_truths()`` returns all of them at once, by those names.
obs: ``cell_type`` (group), ``disease`` (disease / control), ``donor``, ``batch``, ``depth``, then
``state`` and ``interaction_label`` when enabled; var: ``regulator``, ``baseline_share``. Cells
are simulated in chunks of about 4M dense values (threads overlap them; each chunk has its own
seeded generator, so the same parameters and seed give the same data) and stored as CSR, 8 bytes
per non-zero per copy (X and layers["counts"]).
Measured on 2 shared cores: 100k cells x 2,000 genes in 16 s; 1M cells x 1,000 genes
(mean_depth 2,000, 430 non-zeros per cell) in 150 s with a 9 GB peak.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field, model_validator

from grnx_core import ComponentParams, DataSource
from grnx_core.errors import DataError

if TYPE_CHECKING:
    import anndata

#: Dense values per generated chunk; bounds the working memory (about 16 bytes each at the peak).
_CHUNK_VALUES = 4_000_000
#: Chunks simulated at once; each holds about 16 bytes per dense value at its peak.
_MAX_THREADS = 4


@dataclass(frozen=True)
class PlantedNetwork:
    """The simulated network: parent -> child weights for control and disease cells."""

    genes: np.ndarray  # gene names
    n_regulators: int
    weights_control: np.ndarray  # (n_regulators, n_genes)
    weights_disease: np.ndarray  # (n_regulators, n_genes)
    levels: list[np.ndarray]  # genes computed together, in topological order (level 0: masters)
    disease_edges: pd.DataFrame

    def edges(self, weights: np.ndarray) -> pd.DataFrame:
        sources, targets = np.nonzero(weights)
        return pd.DataFrame(
            {
                "source": self.genes[sources],
                "target": self.genes[targets],
                "sign": np.sign(weights[sources, targets]).astype(np.int8),
                "weight": weights[sources, targets],
            }
        )


def plant_network(
    n_genes: int,
    n_regulators: int,
    mean_in_degree: float,
    fraction_negative: float,
    n_rewired: int,
    n_gained: int,
    rng: np.random.Generator,
) -> PlantedNetwork:
    """Draw the DAG, its weights and the edges the disease rewires."""
    genes = np.array([f"G{i:0{len(str(n_genes - 1))}d}" for i in range(n_genes)], dtype=object)
    n_masters = max(1, n_regulators // 4)
    weights = np.zeros((n_regulators, n_genes))
    for child in range(n_masters, n_genes):
        candidates = min(child, n_regulators)
        in_degree = min(candidates, 1 + rng.poisson(max(mean_in_degree - 1.0, 0.0)))
        parents = rng.choice(candidates, size=in_degree, replace=False)
        signs = np.where(rng.random(in_degree) < fraction_negative, -1.0, 1.0)
        weights[parents, child] = signs * rng.uniform(0.6, 1.2, in_degree) / np.sqrt(in_degree)
    planted = np.argwhere(weights != 0)
    if n_rewired > len(planted):
        raise DataError(
            f"data source 'synthetic': n_rewired={n_rewired} but the network has only {len(planted)} edges; "
            f"lower n_rewired or raise n_genes / mean_in_degree."
        )
    disease = weights.copy()
    flipped = planted[rng.choice(len(planted), size=n_rewired, replace=False)]
    disease[flipped[:, 0], flipped[:, 1]] *= -1.0
    # Gained edges: regulator -> a later gene that it does not regulate yet (keeps the DAG).
    free = np.argwhere(
        (weights == 0)
        & (np.arange(n_genes)[None, :] > np.arange(n_regulators)[:, None])
        & (np.arange(n_genes)[None, :] >= n_masters)
    )
    if n_gained > len(free):
        raise DataError(f"data source 'synthetic': n_gained={n_gained} but only {len(free)} edges are free.")
    gained = free[rng.choice(len(free), size=n_gained, replace=False)]
    disease[gained[:, 0], gained[:, 1]] = np.where(
        rng.random(n_gained) < fraction_negative, -1.0, 1.0
    ) * rng.uniform(0.6, 1.2, n_gained)
    rows = [(s, t, int(np.sign(weights[s, t])), int(np.sign(disease[s, t])), "flipped") for s, t in flipped]
    rows += [(s, t, 0, int(np.sign(disease[s, t])), "gained") for s, t in gained]
    disease_edges = pd.DataFrame(rows, columns=["source", "target", "control_sign", "disease_sign", "change"])
    disease_edges["source"] = genes[disease_edges["source"].to_numpy(dtype=int)]
    disease_edges["target"] = genes[disease_edges["target"].to_numpy(dtype=int)]
    # Levels over the union of both graphs, so one ordering serves control and disease cells.
    levels = topological_levels((weights != 0) | (disease != 0), n_masters)
    return PlantedNetwork(genes, n_regulators, weights, disease, levels, disease_edges)


def topological_levels(union: np.ndarray, n_masters: int) -> list[np.ndarray]:
    """Genes grouped by longest path from a master over the (regulator x gene) edge mask ``union``."""
    n_genes = union.shape[1]
    level = np.zeros(n_genes, dtype=int)
    for child in range(n_masters, n_genes):
        parents = np.nonzero(union[:, child])[0]
        level[child] = 1 + (level[parents].max() if len(parents) else -1)
    return [np.nonzero(level == k)[0] for k in range(level.max() + 1)]


@dataclass(frozen=True)
class PlantedOptions:
    """What the v2 options add to the network: rare-state edges, the DE module, a joint ordering."""

    weights_state: np.ndarray | None  # (n_regulators, n_genes) edges added in rare-state cells
    state_edges: pd.DataFrame  # source, target, sign of those edges
    state_shift: np.ndarray | None  # master-activity shift of rare-state cells
    de_genes: np.ndarray  # indices of the genes whose mean shifts in disease cells
    levels: list[np.ndarray]  # over control, disease and state edges together


def plant_options(
    network: PlantedNetwork,
    rare_state: bool,
    n_state_edges: int,
    state_effect: float,
    n_de_genes: int,
    fraction_negative: float,
    rng: np.random.Generator,
) -> PlantedOptions:
    """Draw the rare state's extra edges and shift, then the DE genes, away from every rewired edge."""
    n_reg, n_genes = network.weights_control.shape
    n_masters = len(network.levels[0])
    genes = network.genes
    weights_state, state_shift = None, None
    state_edges = pd.DataFrame({"source": [], "target": [], "sign": np.array([], dtype=np.int8)})
    union = (network.weights_control != 0) | (network.weights_disease != 0)
    if rare_state:
        # Like gained edges: regulator -> a later non-master gene, absent from both other graphs.
        free = np.argwhere(
            ~union
            & (np.arange(n_genes)[None, :] > np.arange(n_reg)[:, None])
            & (np.arange(n_genes)[None, :] >= n_masters)
        )
        if n_state_edges > len(free):
            raise DataError(
                f"data source 'synthetic': n_state_edges={n_state_edges} but only {len(free)} regulator -> gene "
                "edges are free of the control and disease networks; lower n_state_edges or raise n_genes."
            )
        chosen = free[rng.choice(len(free), size=n_state_edges, replace=False)]
        weights_state = np.zeros((n_reg, n_genes))
        weights_state[chosen[:, 0], chosen[:, 1]] = np.where(
            rng.random(n_state_edges) < fraction_negative, -1.0, 1.0
        ) * rng.uniform(0.6, 1.2, n_state_edges)
        state_shift = rng.normal(0.0, state_effect, n_masters).astype(np.float32)
        sources, targets = np.nonzero(weights_state)
        state_edges = pd.DataFrame(
            {
                "source": genes[sources],
                "target": genes[targets],
                "sign": np.sign(weights_state[sources, targets]).astype(np.int8),
            }
        )
        union = union | (weights_state != 0)
    # DE genes: non-regulators (a count-level shift that moves no child) touching no disease or
    # state edge, so the genes a marker detector should find and the pairs a pair detector should
    # find are disjoint.
    touched = set(network.disease_edges["source"]) | set(network.disease_edges["target"])
    touched |= set(state_edges["source"]) | set(state_edges["target"])
    candidates = np.array([g for g in range(n_reg, n_genes) if genes[g] not in touched], dtype=int)
    if n_de_genes > len(candidates):
        raise DataError(
            f"data source 'synthetic': n_de_genes={n_de_genes} but only {len(candidates)} genes are neither "
            "regulators nor ends of a disease or state edge; lower n_de_genes or raise n_genes."
        )
    de_genes = (
        np.sort(rng.choice(candidates, size=n_de_genes, replace=False)) if n_de_genes else candidates[:0]
    )
    levels = topological_levels(union, n_masters) if rare_state else network.levels
    return PlantedOptions(weights_state, state_edges, state_shift, de_genes, levels)


def balanced_donors(
    n_donors: int, n_disease: int, n_batches: int, n_cells: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``donor_design: balanced``: each donor's disease flag and batch, and each cell's donor.

    ``n_disease`` donors, drawn at random, are disease; the j-th disease and the j-th control donor
    (in donor order) go to batch ``j % n_batches``. Donors get ``n_cells // n_donors`` cells, the
    remainder one each to the first donors of the sequence disease, control, disease, ... so the
    two conditions' cell totals differ by at most one; cells are in random order.
    """
    donor_disease = np.zeros(n_donors, dtype=bool)
    donor_disease[rng.choice(n_donors, n_disease, replace=False)] = True
    disease, control = np.nonzero(donor_disease)[0], np.nonzero(~donor_disease)[0]
    donor_batch = np.empty(n_donors, dtype=np.int64)
    donor_batch[disease] = np.arange(len(disease)) % n_batches
    donor_batch[control] = np.arange(len(control)) % n_batches
    # Disease and control donors interleaved, the longer list's tail last.
    pairs = min(len(disease), len(control))
    interleaved = np.concatenate(
        [np.column_stack([disease[:pairs], control[:pairs]]).ravel(), disease[pairs:], control[pairs:]]
    )
    cells_per_donor = np.full(n_donors, n_cells // n_donors)
    cells_per_donor[interleaved[: n_cells % n_donors]] += 1
    cell_donor = rng.permutation(np.repeat(np.arange(n_donors), cells_per_donor)).astype(np.int32)
    return donor_disease, donor_batch, cell_donor


#: the obs columns every simulated dataset has (see the module docstring)
OBS_COLUMNS = ("cell_type", "disease", "donor", "batch", "depth")
#: obs columns added by options: ``state`` with ``rare_state_fraction > 0``, ``interaction_label``
#: with ``interaction_label: true``
STATE_COLUMN, INTERACTION_COLUMN = "state", "interaction_label"


@dataclass(frozen=True)
class _ChunkOptions:
    """Per-run inputs of the v2 options, shared by every chunk (None where an option is off)."""

    is_rare: np.ndarray | None
    weights_state: np.ndarray | None  # float32, added to the control or disease weights
    state_shift: np.ndarray | None
    de_factor: np.ndarray | None  # (n_genes,) mean multiplier in disease cells
    requested_depth: bool
    tracked: tuple[int, int] | None  # (parent, child) whose innovations define the interaction label


class Synthetic(DataSource):
    """Counts simulated from a planted network (the model is in the module docstring).

    ``donor_design: balanced`` (with ``n_donors`` >= 20) gives the design donor-level splits need:
    equal disease and control donors at ``disease_fraction`` 0.5 (else ``round(fraction *
    n_donors)`` disease donors), equal cells per donor (the remainder spread one per donor, the
    conditions alternating) and each batch holding both conditions; a condition with under 2
    donors, more batches than the smaller condition has donors, an odd ``n_donors`` at 0.5 or
    fewer cells than donors is refused. Split it with the ``split`` preprocessor stratified by
    condition (``donor_key: donor``, ``label_key: disease``): no donor is on both sides and each
    side holds both conditions. The default ``random`` design is unchanged.

    ``ground_truths()`` gives every edge truth of one simulation by name (``planted``,
    ``disease``, and ``state`` when there is a rare state with edges); ``ground_truth()`` is the
    one that ``ground_truth_edges`` names.
    """

    name = "synthetic"
    description = "Simulated NB counts from a planted signed network; a disease label rewires chosen edges."
    reference = "https://doi.org/10.1038/s41592-019-0690-6"

    class Params(ComponentParams):
        n_cells: int = Field(2000, ge=2, description="number of cells")
        n_genes: int = Field(100, ge=2, description="number of genes")
        n_regulators: int = Field(20, ge=1, description="genes that regulate others (the first ones)")
        mean_in_degree: float = Field(2.0, ge=1.0, description="mean number of parents per regulated gene")
        fraction_negative: float = Field(0.3, ge=0.0, le=1.0, description="fraction of repressing edges")
        n_groups: int = Field(3, ge=1, description="cell groups (cell types), obs 'cell_type'")
        group_effect: float = Field(0.5, ge=0.0, description="sd of the cell-group means of master activity")
        n_donors: int = Field(8, ge=2, description="donors, obs 'donor'; each is disease or control")
        disease_fraction: float = Field(
            0.5, gt=0.0, lt=1.0, description="fraction of donors with the disease"
        )
        donor_design: Literal["random", "balanced"] = Field(
            "random",
            description="random: Dirichlet donor sizes, batches by donor index; balanced: equal cells per "
            "donor, equal disease / control donors at disease_fraction 0.5, each batch holding both "
            "conditions (use n_donors >= 20 for donor-level splits)",
        )
        donor_effect: float = Field(0.1, ge=0.0, description="sd of per-donor shifts of master activity")
        n_batches: int = Field(
            2, ge=1, description="sequencing batches, obs 'batch' (donors are nested in them)"
        )
        batch_effect: float = Field(0.1, ge=0.0, description="log-normal sd of per-batch gene factors")
        n_rewired: int = Field(5, ge=0, description="planted edges whose sign flips in disease cells")
        n_gained: int = Field(5, ge=0, description="edges present only in disease cells")
        noise: float = Field(0.8, gt=0.0, description="sd of the latent noise per cell and gene")
        effect_size: float = Field(
            1.0, gt=0.0, description="log-fold change of expression per unit of activity"
        )
        mean_depth: float = Field(5000.0, gt=0.0, description="mean UMIs per cell")
        depth_sd: float = Field(0.4, ge=0.0, description="log-normal sd of sequencing depth across cells")
        depth: Literal["approximate", "requested"] = Field(
            "approximate",
            description="approximate: depth divided by a rough scale of exp(activity) (the realised mean "
            "drifts below mean_depth); requested: each cell's expected total equals its drawn depth",
        )
        dispersion: float = Field(5.0, gt=0.0, description="negative-binomial size (variance mu + mu^2/size)")
        n_de_genes: int = Field(
            0, ge=0, description="genes whose mean is multiplied by de_fold_change in disease cells"
        )
        de_fold_change: float = Field(2.0, gt=0.0, description="mean fold change of the DE genes in disease")
        rare_state_fraction: float = Field(
            0.0, ge=0.0, le=0.25, description="share of cells in a rare state (obs 'state'); 0: none"
        )
        n_state_edges: int = Field(5, ge=0, description="edges present only in rare-state cells")
        state_effect: float = Field(
            1.0, ge=0.0, description="sd of the rare state's shift of master activity (sets it apart)"
        )
        interaction_label: bool = Field(
            False, description="add obs 'interaction_label', set by a parent x child product only"
        )
        ground_truth_edges: Literal["planted", "disease", "state"] = Field(
            "planted",
            description="what ground_truth() returns: the control network, the disease-specific edges "
            "or the rare state's edges",
        )
        seed: int = Field(0, description="seed of the simulation")

        @model_validator(mode="after")
        def _regulators_fit(self):
            if self.n_regulators >= self.n_genes:
                raise ValueError(f"n_regulators ({self.n_regulators}) must be below n_genes ({self.n_genes})")
            if self.n_de_genes and self.de_fold_change == 1.0:
                raise ValueError(
                    f"n_de_genes={self.n_de_genes} with de_fold_change=1 shifts nothing; "
                    "set de_fold_change to the fold change wanted (e.g. 2) or n_de_genes to 0"
                )
            if self.ground_truth_edges == "state" and not (
                self.rare_state_fraction > 0 and self.n_state_edges
            ):
                raise ValueError(
                    "ground_truth_edges: state needs a rare state with edges (rare_state_fraction > 0 and "
                    f"n_state_edges > 0); found rare_state_fraction={self.rare_state_fraction}, "
                    f"n_state_edges={self.n_state_edges}"
                )
            if self.donor_design == "balanced":
                self._check_balanced()
            return self

        def _check_balanced(self) -> None:
            """Refuse a balanced design that a donor-level split could not keep balanced."""
            where = "donor_design: balanced"
            if self.disease_fraction == 0.5 and self.n_donors % 2:
                raise ValueError(
                    f"{where} with disease_fraction 0.5 needs an even n_donors to give equal disease and "
                    f"control donors; found n_donors={self.n_donors}; use {self.n_donors + 1} (20 or more "
                    "for donor-level splits)"
                )
            n_disease = round(self.disease_fraction * self.n_donors)
            n_control = self.n_donors - n_disease
            if min(n_disease, n_control) < 2:
                raise ValueError(
                    f"{where} needs at least 2 donors per condition so a donor-level split can put both "
                    f"conditions on each side; n_donors={self.n_donors} with disease_fraction="
                    f"{self.disease_fraction} gives {n_disease} disease and {n_control} control donors; "
                    "raise n_donors (20 or more) or bring disease_fraction toward 0.5"
                )
            if self.n_batches > min(n_disease, n_control):
                raise ValueError(
                    f"{where} puts donors of both conditions in every batch, so n_batches must be at most "
                    f"the smaller condition's donors ({min(n_disease, n_control)}); found n_batches="
                    f"{self.n_batches}; lower n_batches or raise n_donors"
                )
            if self.n_cells < self.n_donors:
                raise ValueError(
                    f"{where} gives every donor n_cells // n_donors cells; n_cells={self.n_cells} is below "
                    f"n_donors={self.n_donors}, which leaves donors without cells; raise n_cells"
                )

    @cached_property
    def network(self) -> PlantedNetwork:
        rng = np.random.default_rng([self.seed, 0])
        return plant_network(
            self.n_genes,
            self.n_regulators,
            self.mean_in_degree,
            self.fraction_negative,
            self.n_rewired,
            self.n_gained,
            rng,
        )

    @cached_property
    def options(self) -> PlantedOptions:
        # Its own stream: the default data (every option off) is drawn exactly as before.
        return plant_options(
            self.network,
            self.rare_state_fraction > 0,
            self.n_state_edges,
            self.state_effect,
            self.n_de_genes,
            self.fraction_negative,
            np.random.default_rng([self.seed, 3]),
        )

    def ground_truth(self) -> pd.DataFrame:
        """The control network, or the disease-specific edges (``sign``: the disease sign), or the
        rare state's edges. The DE genes are not edges; they are in ``uns["synthetic"]["de_genes"]``."""
        return self._truth(self.ground_truth_edges)

    def ground_truths(self) -> dict[str, pd.DataFrame]:
        """Every edge truth of this simulation by name, each as ``ground_truth()`` gives it for that
        ``ground_truth_edges`` (columns source, target, sign; directed): ``planted`` (the control
        network), ``disease`` (the flipped and gained edges, disease sign) and, when there is a rare
        state with edges (``rare_state_fraction > 0`` and ``n_state_edges > 0``), ``state``. Each
        call returns new frames; nothing is loaded."""
        names = ["planted", "disease"]
        if self.rare_state_fraction > 0 and self.n_state_edges:
            names.append("state")
        return {name: self._truth(name) for name in names}

    def _truth(self, which: str) -> pd.DataFrame:
        if which == "disease":
            edges = self.network.disease_edges.rename(columns={"disease_sign": "sign"})
            return edges[["source", "target", "sign"]].reset_index(drop=True)
        if which == "state":
            return self.options.state_edges.copy()
        return self.network.edges(self.network.weights_control)[["source", "target", "sign"]]

    def _chunk(
        self,
        rng,
        cells,
        network,
        weights_control,
        weights_disease,
        is_disease,
        group,
        donor,
        group_means,
        donor_shift,
        depth,
        share,
        batch_factor,
        cell_batch,
        options: _ChunkOptions,
        levels: list[np.ndarray],
    ) -> tuple[sp.csr_matrix, np.ndarray | None]:
        """Counts of one chunk of cells, in float32, straight to CSR; and, when tracked, whether the
        tracked parent's and child's innovations have the same sign."""
        n_rows, n_genes, n_reg = cells.stop - cells.start, self.n_genes, self.n_regulators
        masters = levels[0]
        innovations: dict[int, np.ndarray] = {}
        activity = np.zeros((n_rows, n_genes), dtype=np.float32)
        activity[:, masters] = group_means[group[cells]] + donor_shift[donor[cells]]
        master_noise = self.noise * rng.standard_normal((n_rows, len(masters)), dtype=np.float32)
        activity[:, masters] += master_noise
        innovations.update(zip(masters.tolist(), master_noise.T))
        disease = is_disease[cells]
        # Rows that share one weight matrix (control / disease, each common / rare when enabled).
        row_weights = [(np.nonzero(~disease)[0], weights_control), (np.nonzero(disease)[0], weights_disease)]
        if options.is_rare is not None:
            rare = options.is_rare[cells]
            activity[np.ix_(np.nonzero(rare)[0], masters)] += options.state_shift
            row_weights = [
                (np.nonzero(in_group & keep)[0], weights + extra)
                for in_group, weights in ((~disease, weights_control), (disease, weights_disease))
                for keep, extra in ((~rare, 0.0), (rare, options.weights_state))
            ]
        for level in levels[1:]:
            regulators = np.tanh(activity[:, :n_reg])
            drive = np.empty((n_rows, len(level)), dtype=np.float32)
            for rows, weights in row_weights:
                drive[rows] = regulators[rows] @ weights[:, level]
            level_noise = self.noise * rng.standard_normal(drive.shape, dtype=np.float32)
            drive += level_noise
            innovations.update(zip(level.tolist(), level_noise.T))
            activity[:, level] = drive
        same_sign = None
        if options.tracked is not None:
            parent, child = options.tracked
            same_sign = (innovations[parent] > 0) == (innovations[child] > 0)
        del innovations
        mean = np.exp(np.float32(self.effect_size) * activity, out=activity)
        mean *= depth[cells, None].astype(np.float32)
        mean *= share[None, :].astype(np.float32)
        mean *= batch_factor[cell_batch[cells]]
        if options.de_factor is not None:
            mean[disease] *= options.de_factor
        if options.requested_depth:
            # The NB mean is the expected count, so this makes each cell's expected total its depth.
            mean *= (depth[cells] / mean.sum(axis=1, dtype=np.float64)).astype(np.float32)[:, None]
        # Gamma-Poisson mixture = negative binomial with this mean and size `dispersion`.
        rate = rng.standard_gamma(self.dispersion, mean.shape, dtype=np.float32)
        rate *= mean
        rate *= np.float32(1.0 / self.dispersion)
        del mean, activity
        counts = rng.poisson(rate).ravel()
        del rate
        nonzero = np.flatnonzero(counts)
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(nonzero // n_genes, minlength=n_rows), out=indptr[1:])
        matrix = sp.csr_matrix(
            (counts[nonzero].astype(np.float32), (nonzero % n_genes).astype(np.int32), indptr),
            shape=(n_rows, n_genes),
        )
        return matrix, same_sign

    def ground_truth_directed(self) -> bool:
        return True

    def obs_columns(self) -> list[str] | None:
        columns = list(OBS_COLUMNS)
        if self.rare_state_fraction > 0:
            columns.append(STATE_COLUMN)
        if self.interaction_label:
            columns.append(INTERACTION_COLUMN)
        return columns

    def _interaction_edge(self, share: np.ndarray) -> tuple[int, int]:
        """The control edge, untouched by disease, state or DE, whose genes are best measured."""
        network, options = self.network, self.options
        usable = network.weights_control != 0
        usable &= network.weights_control == network.weights_disease
        if options.weights_state is not None:
            usable &= options.weights_state == 0
        usable[:, options.de_genes] = False
        pairs = np.argwhere(usable)
        if len(pairs) == 0:
            raise DataError(
                "data source 'synthetic': interaction_label needs a planted edge that no disease, state or "
                "DE option touches, and none is left; lower n_rewired / n_de_genes or raise n_genes."
            )
        best = np.argmax(np.minimum(share[pairs[:, 0]], share[pairs[:, 1]]))
        return int(pairs[best, 0]), int(pairs[best, 1])

    def _rare_cells(self) -> np.ndarray | None:
        if self.rare_state_fraction == 0:
            return None
        n_rare = round(self.rare_state_fraction * self.n_cells)
        if n_rare < 1 or n_rare == self.n_cells:
            raise DataError(
                f"data source 'synthetic': rare_state_fraction={self.rare_state_fraction} of "
                f"n_cells={self.n_cells} gives {n_rare} rare cells; raise n_cells or the fraction "
                "so at least one cell is rare (or set it to 0 for no rare state)."
            )
        is_rare = np.zeros(self.n_cells, dtype=bool)
        is_rare[np.random.default_rng([self.seed, 4]).choice(self.n_cells, n_rare, replace=False)] = True
        return is_rare

    def load(self) -> anndata.AnnData:
        import anndata as ad

        network, options = self.network, self.options
        rng = np.random.default_rng([self.seed, 1])
        n_cells, n_genes, n_reg = self.n_cells, self.n_genes, self.n_regulators
        masters = network.levels[0]

        # Per-cell and per-donor facts (cheap even for millions of cells).
        n_disease = max(1, min(self.n_donors - 1, round(self.disease_fraction * self.n_donors)))
        donor_disease = np.zeros(self.n_donors, dtype=bool)
        donor_disease[rng.choice(self.n_donors, n_disease, replace=False)] = True
        donor_batch = np.arange(self.n_donors) % self.n_batches
        donor_size = rng.dirichlet(np.full(self.n_donors, 5.0))
        group_size = rng.dirichlet(np.full(self.n_groups, 5.0))
        donor = rng.choice(self.n_donors, size=n_cells, p=donor_size).astype(np.int32)
        group = rng.choice(self.n_groups, size=n_cells, p=group_size).astype(np.int32)
        depth = self.mean_depth * rng.lognormal(-0.5 * self.depth_sd**2, self.depth_sd, n_cells)
        group_means = rng.normal(0.0, self.group_effect, (self.n_groups, len(masters))).astype(np.float32)
        donor_shift = rng.normal(0.0, self.donor_effect, (self.n_donors, len(masters))).astype(np.float32)
        log_share = rng.normal(0.0, 1.0, n_genes)
        share = np.exp(log_share - log_share.max())
        share /= share.sum()
        batch_factor = rng.lognormal(0.0, self.batch_effect, (self.n_batches, n_genes)).astype(np.float32)
        if self.donor_design == "balanced":
            # Its own stream, after the default draws: groups, depths and the rest stay as they were.
            donor_disease, donor_batch, donor = balanced_donors(
                self.n_donors, n_disease, self.n_batches, n_cells, np.random.default_rng([self.seed, 5])
            )
        cell_batch = donor_batch[donor]
        # exp(effect_size * a) has mean > 1; dividing by its rough scale keeps the depth about as set
        # (``depth: requested`` instead normalises each cell's expected total exactly).
        scale = (
            1.0 if self.depth == "requested" else np.exp(0.5 * self.effect_size**2 * (1.0 + self.noise**2))
        )

        is_rare = self._rare_cells()
        de_factor = None
        if len(options.de_genes):
            de_factor = np.ones(n_genes, dtype=np.float32)
            de_factor[options.de_genes] = self.de_fold_change
        tracked = self._interaction_edge(share) if self.interaction_label else None
        chunk_options = _ChunkOptions(
            is_rare=is_rare,
            weights_state=None if options.weights_state is None else options.weights_state.astype(np.float32),
            state_shift=options.state_shift,
            de_factor=de_factor,
            requested_depth=self.depth == "requested",
            tracked=tracked,
        )
        is_disease = donor_disease[donor]
        weights_control = network.weights_control.astype(np.float32)
        weights_disease = network.weights_disease.astype(np.float32)
        chunk = max(1, _CHUNK_VALUES // n_genes)
        starts = range(0, n_cells, chunk)

        def simulate(index: int) -> tuple[sp.csr_matrix, np.ndarray | None]:
            # Each chunk has its own generator, so the result does not depend on the thread count.
            return self._chunk(
                np.random.default_rng([self.seed, 2, index]),
                slice(starts[index], min(starts[index] + chunk, n_cells)),
                network,
                weights_control,
                weights_disease,
                is_disease,
                group,
                donor,
                group_means,
                donor_shift,
                depth / scale,
                share,
                batch_factor,
                cell_batch,
                chunk_options,
                options.levels,
            )

        # numpy's generators and ufuncs release the GIL, so threads overlap the sampling.
        workers = min(len(starts), os.cpu_count() or 1, _MAX_THREADS)
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                blocks = list(pool.map(simulate, range(len(starts))))
        else:
            blocks = [simulate(index) for index in range(len(starts))]
        matrices = [block for block, _ in blocks]
        matrix = sp.vstack(matrices, format="csr") if len(matrices) > 1 else matrices[0]
        same_sign = np.concatenate([labels for _, labels in blocks]) if tracked is not None else None
        del blocks, matrices

        width = len(str(max(self.n_donors, self.n_groups, self.n_batches) - 1))
        obs = pd.DataFrame(
            {  # the columns of OBS_COLUMNS, in that order
                "cell_type": pd.Categorical.from_codes(group, [f"group{i}" for i in range(self.n_groups)]),
                "disease": pd.Categorical.from_codes(is_disease.astype(np.int8), ["control", "disease"]),
                "donor": pd.Categorical.from_codes(
                    donor, [f"donor{i:0{width}d}" for i in range(self.n_donors)]
                ),
                "batch": pd.Categorical.from_codes(
                    donor_batch[donor], [f"batch{i}" for i in range(self.n_batches)]
                ),
                "depth": depth.astype(np.float32),
            },
            index=pd.Index([f"cell{i}" for i in range(n_cells)], name=None),
        )
        if is_rare is not None:
            obs[STATE_COLUMN] = pd.Categorical.from_codes(is_rare.astype(np.int8), ["common", "rare"])
        if same_sign is not None:
            obs[INTERACTION_COLUMN] = pd.Categorical.from_codes(
                same_sign.astype(np.int8), ["opposite", "same"]
            )
        var = pd.DataFrame(
            {"regulator": np.arange(n_genes) < n_reg, "baseline_share": share},
            index=pd.Index(network.genes.astype(str), name=None),
        )
        adata = ad.AnnData(X=matrix, obs=obs, var=var)
        adata.layers["counts"] = matrix.copy()
        edges = network.edges(network.weights_control)
        adata.uns["synthetic"] = {
            "network": edges,
            "disease_edges": network.disease_edges.copy(),
            "params": {k: v for k, v in self.get_params().items()},
        }
        if self.n_de_genes:
            adata.uns["synthetic"]["de_genes"] = network.genes[options.de_genes].astype(str).tolist()
        if is_rare is not None:
            adata.uns["synthetic"]["state_edges"] = options.state_edges.copy()
        if tracked is not None:
            adata.uns["synthetic"]["interaction_edge"] = {
                "parent": str(network.genes[tracked[0]]),
                "child": str(network.genes[tracked[1]]),
            }
        adata.uns["grnx_data"] = {"source": self.name, "counts": "layers/counts"}
        return adata
