"""How many cells a sampler draws: the ``fraction`` / ``n_cells`` parameters shared by all samplers."""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from grnx_core import ComponentParams
from grnx_core.errors import DataError


class SampleSizeParams(ComponentParams):
    """``fraction`` or ``n_cells``: exactly one says how many cells to draw."""

    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of the cells to draw, in (0, 1]; rounded to the nearest count, at least 1. "
        "Give this or n_cells.",
    )
    n_cells: int | None = Field(
        None, ge=1, description="number of cells to draw (without replacement). Give this or fraction."
    )

    @model_validator(mode="after")
    def _exactly_one_size(self) -> SampleSizeParams:
        if (self.fraction is None) == (self.n_cells is None):
            given = "both" if self.fraction is not None else "neither"
            raise ValueError(
                f"set exactly one of fraction (share of cells, in (0, 1]) or n_cells (a count); "
                f"{given} was given"
            )
        return self


def sample_size(n_obs: int, fraction: float | None, n_cells: int | None, who: str) -> int:
    """The number of cells to draw from ``n_obs``; errors say what to change."""
    if n_obs < 1:
        raise DataError(f"{who}: the data has no cells to sample from.")
    if n_cells is not None:
        if n_cells > n_obs:
            raise DataError(
                f"{who}: n_cells={n_cells} is more than the {n_obs} cells in the data; sampling is "
                f"without replacement. Lower sampler.params.n_cells or use fraction."
            )
        return int(n_cells)
    assert fraction is not None
    # Round half up so that e.g. 1% of 150 cells is 2, and never draw zero cells.
    return int(min(n_obs, max(1, math.floor(fraction * n_obs + 0.5))))
