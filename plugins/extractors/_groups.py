"""The case and control cells of an extractor's group comparison (``group_key``, ``case``, ``control``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from grnx_core import DataError, RunContext

if TYPE_CHECKING:
    import anndata


def case_control_masks(
    context: RunContext,
    adata: anndata.AnnData,
    group_key: str,
    case: str | None,
    control: str | None,
    who: str,
    min_cells: int = 1,
) -> tuple[str, dict[str, np.ndarray]]:
    """``(key, {"case": mask, "control": mask})`` over the cells of ``adata`` (e.g. the sample);
    refuses a missing case/control value or a group with fewer than ``min_cells`` cells, naming
    the values present."""
    key = context.require_obs(group_key, "group_key", who)
    groups = adata.obs[key].astype(str).to_numpy()
    found = sorted(set(groups))
    if case is None or control is None:
        raise DataError(
            f"{who}: with group_key {key!r}, set params.case and params.control to two of its values "
            f"({', '.join(found[:10])})."
        )
    masks = {
        role: group_mask(groups, key, role, value, who, min_cells)
        for role, value in (("case", case), ("control", control))
    }
    return key, masks


def case_mask(
    context: RunContext,
    adata: anndata.AnnData,
    group_key: str,
    case: str | None,
    who: str,
    min_cells: int = 1,
) -> tuple[str, np.ndarray]:
    """``(key, mask)`` of the case cells of ``adata`` alone (a disease-only score)."""
    key = context.require_obs(group_key, "group_key", who)
    groups = adata.obs[key].astype(str).to_numpy()
    if case is None:
        raise DataError(
            f"{who}: with group_key {key!r}, set params.case to one of its values "
            f"({', '.join(sorted(set(groups))[:10])})."
        )
    return key, group_mask(groups, key, "case", case, who, min_cells)


def group_mask(groups: np.ndarray, key: str, role: str, value: str, who: str, min_cells: int) -> np.ndarray:
    """Cells whose group is ``value``; refuses fewer than ``min_cells``, naming the values present."""
    mask = groups == str(value)
    count = int(mask.sum())
    if count < min_cells:
        raise DataError(
            f"{who}: {role} group {value!r} of obs[{key!r}] has {count} cells (needs {min_cells} or "
            f"more). Values present: {', '.join(sorted(set(groups))[:10])}."
        )
    return mask
