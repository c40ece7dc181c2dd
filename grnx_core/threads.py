"""How many torch CPU threads a stage uses: ``execution.num_threads``, else ``GRNX_NUM_THREADS``.

On a machine shared with other jobs one thread can be several times faster than two, so training
and the model-reading extractors (attention, gene embeddings) take the setting alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from grnx_core.errors import GrnxError

if TYPE_CHECKING:
    from grnx_core.context import RunContext


def thread_count(context: RunContext | None) -> int | None:
    """``execution.num_threads``, else the ``GRNX_NUM_THREADS`` variable, else None (torch's default)."""
    configured = context.execute.num_threads if context is not None else None
    if configured is not None:
        return int(configured)
    text = os.environ.get("GRNX_NUM_THREADS", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise GrnxError(
            f"GRNX_NUM_THREADS must be a whole number >= 1 (torch CPU threads), got {text!r}. "
            f"Unset it or set e.g. GRNX_NUM_THREADS=1."
        )
    return int(text)


@contextlib.contextmanager
def torch_threads(context: RunContext | None) -> Iterator[None]:
    """Run the block with the configured number of torch CPU threads, then restore the previous."""
    import torch

    wanted = thread_count(context)
    previous = torch.get_num_threads()
    if wanted is not None:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
