"""Progress of long steps (training, tokenising, attention, hashing, permutations) on stderr.

``grnx run`` turns it on; the Python API and the tests keep it off unless ``GRNX_PROGRESS=1``.
On a terminal each step is a tqdm bar (count, rate, time left, and what the step reports, such
as the loss); bars of nested steps stack (epochs over batches) and the runner's messages go
through ``say`` so that they print above the bars instead of breaking them. When stderr is not a
terminal (a log file, CI) a bar would be a stream of carriage returns: a plain line is printed
instead, at most every ``LOG_EVERY_S`` seconds and when the step ends.

Components use it as ``for batch in progress(batches, desc="train epoch 1/3", unit="batch")``
or, for work counted in cells, ``with progress(total=n, desc=..., unit="cell") as bar:
bar.update(k)``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")
#: seconds between two plain progress lines when stderr is not a terminal
LOG_EVERY_S = 30.0
_enabled: bool | None = None
_open_bars = 0


def set_enabled(enabled: bool | None) -> bool | None:
    """Turn progress on or off for this process (None: follow ``GRNX_PROGRESS``); returns the
    previous setting, to restore it."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("GRNX_PROGRESS", "0").strip().lower() in ("1", "true", "yes", "on")


def say(message: str) -> None:
    """Print a line on stderr without breaking the progress bars on screen."""
    if _open_bars and sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """One step's progress: a tqdm bar on a terminal, periodic lines otherwise, nothing when off."""

    def __init__(
        self, iterable: Iterable[Any] | None, total: int | None, desc: str, unit: str, log_every_s: float
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc = desc
        self.unit = unit
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self._bar: Any = None
        self._lines = False
        self._log_every_s = log_every_s
        self._started = self._last_line = time.perf_counter()
        self._closed = False
        if not enabled():
            return
        global _open_bars
        _open_bars += 1
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                desc=desc,
                unit=unit,
                file=sys.stderr,
                leave=_open_bars == 1,  # nested bars vanish when done; the outer one stays
                position=_open_bars - 1,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        else:
            self._lines = True

    # -- reporting ----------------------------------------------------------------------------

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` (e.g. ``loss=0.41``) is shown beside the count."""
        self.count += n
        if postfix:
            self.postfix.update(postfix)
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _short(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self._lines and time.perf_counter() - self._last_line >= self._log_every_s:
            self._line()

    def set_postfix(self, **postfix: Any) -> None:
        self.update(0, **postfix)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is None and not self._lines:
            return
        global _open_bars
        _open_bars = max(0, _open_bars - 1)
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            self._line(done=True)

    def _line(self, done: bool = False) -> None:
        self._last_line = time.perf_counter()
        elapsed = self._last_line - self._started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        text = f"[grnx]   {self.desc}: {self.count}{of} {self.unit}s, {rate:.3g} {self.unit}s/s"
        if done:
            text += f", done in {elapsed:.1f} s"
        elif self.total and rate > 0:
            text += f", about {_duration((self.total - self.count) / rate)} left"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {_short(v)}" for k, v in self.postfix.items())
        print(text, file=sys.stderr, flush=True)

    # -- protocols ----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "progress(total=...) has no iterable: call update()"
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[_T] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    log_every_s: float = LOG_EVERY_S,
) -> Progress:
    """Progress over ``iterable`` (iterate it) or over ``total`` units (call ``update``)."""
    return Progress(iterable, total, desc, unit, log_every_s)


def _length(iterable: Iterable[Any] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
