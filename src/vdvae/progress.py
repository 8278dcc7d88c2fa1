"""Progress of the long commands (training, evaluation, IW bounds, sampling, encoding, decoding,
compression): units done out of the total, their rate and the time left.

On a terminal (stderr is a tty) a tqdm bar; elsewhere (a pipe, a log file, a SLURM job) a plain line
through the log every `VDVAE_PROGRESS_SECONDS` seconds (30 by default) and at the end of work that took
longer: no bar debris, no colour codes in files, and never silence for minutes. tqdm is Lightning's own
dependency; importing it costs milliseconds, so the commands can import this module before they decide to
load Lightning.
"""

import logging
import os
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)

# The words of a line for tqdm's short units.
UNIT_NAMES = {"img": "images", "step": "steps"}


def interval() -> float:
    """Seconds between two progress lines (VDVAE_PROGRESS_SECONDS, default 30)."""
    return float(os.environ.get("VDVAE_PROGRESS_SECONDS", 30))


def progress(total: int, desc: str, unit: str = "img", initial: int = 0):
    """Progress over `total` units (images by default), `initial` of them done: a tqdm bar on a terminal,
    else `ProgressLines`. Use it as a context manager; advance it with `bar.update(n)`."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True)
    return ProgressLines(total, desc, unit, initial)


class ProgressLines:
    """tqdm's interface (update, set_postfix_str, reset, close), writing a line such as `evaluating: 1,200 of
    10,000 images (12%), 45.1 images/s, 3 min 15 s left` every `interval()` seconds."""

    def __init__(self, total: int, desc: str, unit: str = "img", initial: int = 0):
        self.total, self.desc, self.unit = total, desc, UNIT_NAMES.get(unit, unit)
        self.postfix, self.closed = "", False
        self.reset(total, initial)

    def reset(self, total: int | None = None, initial: int = 0):
        self.total = self.total if total is None else total
        self.n = self.first = self.written = initial
        self.started = self.last_line = time.monotonic()

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last_line >= interval():
            self.write(now)

    def set_postfix_str(self, text: str, refresh: bool = True):
        self.postfix = text

    def write(self, now: float):
        self.last_line, self.written = now, self.n
        rate = (self.n - self.first) / max(now - self.started, 1e-9)
        of = f" of {self.total:,}" if self.total else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = f", {duration((self.total - self.n) / rate)} left" if self.total and rate > 0 else ""
        postfix = f"; {self.postfix}" if self.postfix else ""
        log.info("%s: %s%s %s%s, %.3g %s/s%s%s", self.desc, f"{self.n:,}", of, self.unit, share, rate, self.unit, left,
                 postfix)

    def close(self):
        """A last line, where the work took long enough to have had one and the last did not say all."""
        now = time.monotonic()
        if not self.closed and now - self.started >= interval() and self.n != self.written:
            self.write(now)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def duration(seconds: float) -> str:
    """`3 h 12 min`, `4 min 5 s`, `12 s`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def advance(bar, n: int):
    """`bar.update(n)`, where a caller may pass no bar (None): the training callbacks draw none."""
    if bar is not None:
        bar.update(n)
