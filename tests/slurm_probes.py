"""A callback for the jobs of tests/test_slurm.py (importable in a job: the tests put the repository on its
PYTHONPATH, which sbatch passes on): steps made slow enough to be interrupted mid-run, by sleeping, which
changes no number; and where each start of the job began training."""

import os
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
