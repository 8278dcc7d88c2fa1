"""Progress bars for the long commands (evaluation, IW bounds, sampling, encoding, decoding, compression):
images done, images/s and the time left, as Lightning's bar shows for training.

A bar is drawn only on a terminal (stderr is a tty): logs, pipes and non-interactive runs (tests, SLURM jobs)
get no bar output at all. tqdm is Lightning's own dependency; importing it costs milliseconds, so the
commands can import this module before they decide to load Lightning.
"""

import sys

from tqdm import tqdm


def progress(total: int, desc: str, unit: str = "img"):
    """A tqdm bar for `total` units (images by default), on stderr when it is a terminal, else disabled
    (every call on it then does nothing). Use it as a context manager; advance it with `bar.update(n)`."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )


def advance(bar, n: int):
    """`bar.update(n)`, where a caller may pass no bar (None): the training callbacks draw none."""
    if bar is not None:
        bar.update(n)
