"""Callbacks for the runs the tests start (importable there: the tests put the repository on their
PYTHONPATH, which sbatch passes on to SLURM jobs): steps made slow enough to be interrupted mid-run, by
sleeping, which changes no number, and where each start of the job began training (tests/test_slurm.py);
a SIGTERM or a second Ctrl-C at one exact step (tests/test_reliability.py)."""

import os
import signal
import time
from pathlib import Path

from lightning import Callback


class SlowSteps(Callback):
    """Sleep `seconds` after every training step; append `<step> <SLURM_RESTART_COUNT>` to `record` as
    training starts (0 on a fresh start, the step it resumed from after a requeue)."""

    def __init__(self, seconds: float, record: str | None = None):
        self.seconds, self.record = seconds, record

    def on_train_start(self, trainer, module):
        if self.record and trainer.is_global_zero:
            with open(Path(self.record), "a") as file:
                file.write(f"{trainer.global_step} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class SigtermAt(Callback):
    """SIGTERM to this process as training step `step` ends, as a scheduler might send it just then."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class SecondCtrlCAt(Callback):
    """A second Ctrl-C as training step `step` ends (the first one already taken), as the handler sees it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            from vdvae.lifecycle import StopController

            stop = StopController(at_step=True)
            stop.caught = signal.SIGINT
            stop._on_sigint(signal.SIGINT, None)
