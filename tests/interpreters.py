"""How the tests start `python <script> args...`: in a child of a fork server (tests/forkserver.py),
which saves each command the ~10 s of importing torch and Lightning, wherever such a child is the same
as a fresh interpreter. A server serves one set of the variables read at start-up (PYTHON*,
OMP_NUM_THREADS, ...) and starts at the second command with that set: the first runs fresh, as does
every command that asks for it (`fresh=True`: where the test kills the process with SIGKILL, which the
client cannot forward), and every command with VDVAE_TESTS_FRESH_INTERPRETERS=1."""

import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from tests import forkserver

FORKSERVER = forkserver.__file__
READ_AT_STARTUP = re.compile(r"^(PYTHON|OMP_|MKL_|OPENBLAS_|KMP_|GOMP_|TORCH|CUDA|NCCL|LD_|MALLOC|NUMEXPR|HYDRA_FULL)")


def startup_variables(env: dict) -> dict:
    return {k: v for k, v in env.items() if READ_AT_STARTUP.match(k)}


class Server:
    """A fork server of this test process: the interpreter `interpreter` with the environment `env`."""

    def __init__(self, interpreter: str, env: dict):
        self.socket = os.path.join(tempfile.mkdtemp(prefix="vdvae-forkserver-"), "socket")
        self.log = self.socket + ".log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [interpreter, FORKSERVER, "serve", self.socket],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in the terminal stops the tests, not the server first
            )
        atexit.register(self.stop)
        deadline = time.time() + 300
        while not os.path.exists(self.socket) and self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        self.ready = os.path.exists(self.socket)
        if not self.ready and self.proc.poll() != forkserver.THREADS:  # threads: expected, not forkable
            why = Path(self.log).read_text()[-500:]
            warnings.warn(f"the fork server did not start ({why}); fresh interpreters instead", stacklevel=3)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)


_servers: dict[tuple, Server | None] = {}  # per interpreter and start-up variables: None after its first command


def python(script: str, *args: str, env: dict | None = None, fresh=False, interpreter=sys.executable) -> list[str]:
    """The command line that runs `<interpreter> <script> args...` with the environment `env`: from the
    second command on with the same interpreter and start-up variables, in a forked interpreter."""
    env = os.environ if env is None else env
    interpreter = str(interpreter)
    key = (interpreter, *sorted(startup_variables(env).items()))
    if fresh or env.get("VDVAE_TESTS_FRESH_INTERPRETERS") == "1" or key not in _servers:
        _servers.setdefault(key, None)
        return [interpreter, script, *args]
    if _servers[key] is None:
        _servers[key] = Server(interpreter, dict(env))
    if not _servers[key].ready:
        return [interpreter, script, *args]
    return [interpreter, "-S", FORKSERVER, "run", _servers[key].socket, str(script), *args]
