"""The ways a command can end other than by finishing: the exceptions every layer may raise, the exit
status of each (`EXIT_STATUS`), the one way an error is put in one line, and `refuse`, which ends a
command with that line. Where each is caught, and what happens to the run's folder, is the run lifecycle's
(vdvae.lifecycle); nothing here catches anything."""

import signal
import sys
from typing import NoReturn


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """An error's message on one line (whitespace collapsed), at most `limit` characters; its type's name
    where it has no message."""
    text = " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
    return text if limit is None else text[:limit]


class ConfigError(ValueError):
    """The composed config is inconsistent; the message names the options involved."""


class RunDiverged(ValueError):
    """Training ended with a non-finite objective or test score: the run diverged."""


class TrainingStalled(RuntimeError):
    """Training stopped because every update in a row was skipped; the message says what to change."""


class JobDied(RuntimeError):
    """A sweep job ended with no result: killed outside Python (the out-of-memory killer, SIGKILL, a crash
    of the interpreter, a failed node). Its launcher reports it (hydra_plugins.vdvae_sweepers)."""


class JobEnded(RuntimeError):
    """SLURM stopped the job (SIGTERM) and will not requeue it: scancel, or its time limit."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) arrived: the command stops. A BaseException: `except Exception` never swallows a
    stop, `finally` blocks run, and Lightning passes it on after its on_exception hooks (a
    KeyboardInterrupt it would turn into exit status 1)."""

    signum = signal.SIGINT

    def __init__(self, line: str | None = None):
        super().__init__()
        self.line = line  # what the log says as the command ends, where more than `stopped by <signal>`

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


class Terminated(Interrupted):
    """SIGTERM arrived: the command stops."""

    signum = signal.SIGTERM


# The exit status of each way a command ends without finishing. A stop is 128 + its signal, as the shell
# reports a command it killed, so that SLURM and scripts tell a stopped run from a finished one.
EXIT_STATUS = {Interrupted: 128 + signal.SIGINT, Terminated: 128 + signal.SIGTERM, "refused": 1}


# The longest refusal printed: a message that quotes a field of a file (a megabyte of it) is cut here.
REFUSAL_LIMIT = 2000


def refuse(error: BaseException | str, note: str = "") -> NoReturn:
    """End the command in one line, `Error: ...` (and `note`), with a refusal's exit status."""
    text = one_line(error)
    text = text if len(text) <= REFUSAL_LIMIT else f"{text[:REFUSAL_LIMIT]}... ({len(text):,} characters)"
    print(f"Error: {text}{note}", file=sys.stderr)
    raise SystemExit(EXIT_STATUS["refused"])
