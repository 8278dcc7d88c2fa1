"""Honest interrupts and outputs: a command stopped by SIGTERM or Ctrl-C exits 143 or 130 and leaves no
output that looks complete.

- `signals_interrupt()`: while active, SIGTERM raises `Terminated` and SIGINT (Ctrl-C) `Interrupted`, both
  BaseExceptions: `except Exception` never swallows a stop, `finally` blocks run, and Lightning passes them
  on after its `on_exception` hooks (a KeyboardInterrupt it would turn into exit status 1).
- `CtrlCStopsAtStep`: in training, a first Ctrl-C takes Lightning's SIGTERM path (stop at the next step
  boundary, save, exit 130) instead of interrupting a step half-way; a second one stops at once (130 too).
- `atomic_path(path)`: a temporary name beside `path` (a file or a folder) to write to, moved into place
  only when the block ends normally, removed otherwise. Readers see the whole result or nothing.
"""

import contextlib
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) arrived: the command stops."""

    signum = signal.SIGINT

    @property
    def exit_code(self) -> int:
        """128 + the signal, as the shell reports a command it killed: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


class Terminated(Interrupted):
    """SIGTERM arrived: the command stops."""

    signum = signal.SIGTERM


def _raise(signum, frame):
    raise Terminated() if signum == signal.SIGTERM else Interrupted()


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM raises `Terminated`, SIGINT `Interrupted` inside the block."""
    previous = {signum: signal.signal(signum, _raise) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class CtrlCStopsAtStep:
    """While installed (`with`), SIGINT is turned into SIGTERM for Lightning's handler, which stops training
    at the next step boundary on every rank, where last.ckpt is saved: a Ctrl-C never saves a half-done
    update. `caught` says whether it did. Before Lightning has its handler, and at a second Ctrl-C,
    SIGINT stops at once: `Interrupted`, which Lightning passes on after its on_exception hooks."""

    def __init__(self):
        self.caught = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def _handle(self, signum, frame):
        lightning_listens = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None)
        if self.caught or not lightning_listens:
            raise Interrupted()  # not KeyboardInterrupt, which Lightning turns into exit status 1
        self.caught = True
        log.warning("Ctrl-C: stopping after this step, saving last.ckpt (Ctrl-C again: stop at once)")
        os.kill(os.getpid(), signal.SIGTERM)


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield `.<name>.tmp<pid>` beside `path`; on success it replaces `path` (a file or a folder), on any
    failure or interrupt it is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        # A folder is swapped in two moves: no SIGTERM or Ctrl-C between them (it would lose both).
        with _signals_held():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


@contextlib.contextmanager
def _signals_held():
    """SIGTERM and SIGINT that arrive in the block are handled as it ends, by the handlers there before."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return
    caught = []
    previous = {
        s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        for signum in caught:
            os.kill(os.getpid(), signum)


def write_atomically(path, data: bytes | str) -> Path:
    """Write `data` to `path` through a temporary file that reaches the disk, then is renamed into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "w" if isinstance(data, str) else "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    return Path(path)
