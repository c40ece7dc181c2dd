"""Which process of a multi-process launch (``torchrun``, ``accelerate launch``) this one is.

Read from the environment those launchers set (``RANK``, ``WORLD_SIZE``), so the engine can tell
without importing torch. Under such a launch every process runs the whole recipe (the model stage
trains data-parallel across them); only the main process (rank 0) writes: cache entries, the
MLflow run, the summary.
"""

from __future__ import annotations

import os


def n_processes() -> int:
    """How many processes the launch started (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    """This process's rank among them (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0
