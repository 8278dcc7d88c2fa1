"""SLURM pre-emption and time limits under the submitit launcher: save, requeue, resume.

submitit asks SLURM for USR2 shortly before the time limit (and SLURM sends it on pre-emption); in the
job, submitit's own USR2 handler checkpoints the job (Hydra's launcher resubmits it with its original
overrides, into the same run directory) and requeues it at once, wherever training is. Here USR2 is
turned into Lightning's SIGTERM path instead: every rank stops at the next step boundary and
`last.ckpt` is saved; then submitit's handler runs, from ordinary code, to requeue the job. The
requeued job finds `last.ckpt` in its run directory and resumes from it (vdvae.tasks.train).
"""

import logging
import os
import signal

log = logging.getLogger(__name__)


class RequeueOnSignal:
    """While installed, `signum` makes the training stop and save; `requeue()` then hands the signal to
    the handler that was there before (submitit's). Installed only where such a handler exists."""

    def __init__(self, signum=signal.SIGUSR2):
        self.signum, self.caught = signum, None
        self.previous = signal.getsignal(signum)
        self.active = callable(self.previous) and bool(os.environ.get("SLURM_JOB_ID"))
        if self.active:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        log.warning("%s: stopping at the next step to save, then requeueing", signal.Signals(signum).name)
        self.caught = (signum, frame)
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own stop: at a step boundary, on every rank

    def requeue(self):
        """Run the previous handler (submitit: checkpoint the job, requeue it, exit)."""
        signal.signal(self.signum, self.previous)
        self.previous(*self.caught)
