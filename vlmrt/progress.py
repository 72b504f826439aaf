"""Progress bars (tqdm, on stderr) for the long steps: exports, bench sweeps, building big models.

A bar shows only on a terminal (tqdm's `disable=None`); in a log file the same steps stay plain lines.
"""

from __future__ import annotations

import sys


def bar(total: float, desc: str, unit: str = "it", show: bool = True, **kwargs):
    """A tqdm bar on stderr, shown on a terminal only (and not at all when `show` is False)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if show else True,
                dynamic_ncols=True, **kwargs)


class StepBar:
    """A bar over steps reported one line each (a `progress(message)` callback): every message is one
    step done. The messages are printed above the bar, or as plain lines where no bar is shown.

    Args:
        total: steps expected.
        desc: the bar's label.
        log_prefix: put before each message line, e.g. "vlmrt export".
        show: False hides the bar (the lines are still printed).
    """

    def __init__(self, total: int, desc: str, log_prefix: str, show: bool = True):
        self.bar = bar(total, desc, unit="step", show=show)
        self.prefix = log_prefix

    def step(self, message: str) -> None:
        self.write(message)
        self.bar.update(1)

    def write(self, message: str) -> None:
        line = f"{self.prefix}: {message}"
        if self.bar.disable:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
