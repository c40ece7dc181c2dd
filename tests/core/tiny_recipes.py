"""Sections of the small simulated recipes that the tracking tests (compare, report, study results) run."""

from __future__ import annotations

from typing import Any


def tiny_synthetic_data(n_cells: int) -> dict[str, Any]:
    """A ``data`` section: ``n_cells`` simulated cells x 20 genes, disease label, one rewired and one gained edge."""
    return {
        "name": "synthetic",
        "params": {
            "n_cells": n_cells,
            "n_genes": 20,
            "n_regulators": 4,
            "n_rewired": 1,
            "n_gained": 1,
            "seed": 0,
        },
        "label_key": "disease",
    }


#: a ``preprocess`` section: counts normalised to 10,000 per cell, then log1p
LOG_NORMALISE: list[dict[str, Any]] = [
    {"name": "normalize_total", "params": {"target_sum": 10000}},
    {"name": "log1p", "params": {}},
]
