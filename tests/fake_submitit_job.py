"""train.py as a submitit job sees it on SLURM, without a cluster: submitit's USR2 handler (here it
records that it was asked to checkpoint and requeue, then exits as submitit does) and SIGTERM bypassed."""

import os
import runpy
import signal
import sys
from pathlib import Path

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")


def checkpoint_and_requeue(signum, frame):
    Path(os.environ["FAKE_REQUEUE_MARKER"]).write_text("requeued")
    sys.exit(-1)


signal.signal(signal.SIGUSR2, checkpoint_and_requeue)
signal.signal(signal.SIGTERM, lambda signum, frame: None)  # submitit logs "Bypassing signal SIGTERM"
sys.argv = [TRAIN, *sys.argv[1:]]
runpy.run_path(TRAIN, run_name="__main__")
