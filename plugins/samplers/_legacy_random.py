"""Calling packages that draw from numpy's global random state (``np.random.seed``) without side effects.

geosketch and scSampler seed and draw from the legacy global ``RandomState``. Around each call the
global state is saved and restored, under a lock so that two samplers in threads do not interleave
their draws, and the seed is taken from the sampler's generator: the same generator gives the same
sample, and the caller's own use of ``np.random`` is left as it was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_GLOBAL_RANDOM = threading.Lock()


def package_seed(rng: np.random.Generator) -> int:
    """The integer seed handed to a package: the first draw of ``rng`` in ``[0, 2^31 - 1)``."""
    return int(rng.integers(0, 2**31 - 1))


@contextmanager
def global_random_state_restored() -> Iterator[None]:
    """Run a block that may reseed ``np.random``; the global state is as before afterwards."""
    with _GLOBAL_RANDOM:
        saved = np.random.get_state()
        try:
            yield
        finally:
            np.random.set_state(saved)
