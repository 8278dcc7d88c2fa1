"""A command started through the fork server (tests/interpreters.py) behaves as the same command in a
fresh interpreter: argv, working directory, environment, import path, `__main__`, output, traceback,
exit status, signals; and a command whose client dies dies with it."""

import os
import signal
import subprocess
import sys
import time

from tests.interpreters import FORKSERVER, python

PROBE = """
import os, signal, sys, time
import __main__
print(sys.argv, os.getcwd(), sys.path[0], os.environ.get("PROBE"), __main__.__file__, __main__.__spec__)
print("to stderr", file=sys.stderr)
what = sys.argv[1]
if what == "raise":
    raise ValueError("a failure in the script")
if what == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Python's own SIGINT handler, also where the tests were started with SIGINT ignored (a background job
    # of a non-interactive shell: `make test &`), which Python then keeps.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(sys.argv[2] + ".tmp", "w") as f:  # the pid file appears whole, closed: a signal then finds us asleep
        f.write(str(os.getpid()))
    os.rename(sys.argv[2] + ".tmp", sys.argv[2])
    time.sleep(60)
sys.exit(int(what))
"""


def both(script, *args, env):
    """The command run fresh and through the fork server (the first call with an environment starts
    fresh; the second starts its server)."""
    fresh = python(str(script), *args, env=env, fresh=True)
    python(str(script), *args, env=env)
    forked = python(str(script), *args, env=env)
    assert forked[:3] == [sys.executable, "-S", FORKSERVER]
    return fresh, forked


def test_a_forked_command_is_a_fresh_one(tmp_path):
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "probe.py"
    script.write_text(PROBE)
    env = {**os.environ, "PROBE": "value", "OMP_NUM_THREADS": "1"}  # one thread: a server can fork
    for args in (["0"], ["3"], ["raise"]):
        fresh, forked = both(script, *args, env=env)
        a, b = (subprocess.run(c, cwd=tmp_path, env=env, capture_output=True, text=True) for c in (fresh, forked))
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
        assert str(tmp_path) in a.stdout and "value" in a.stdout
    assert "ValueError: a failure in the script" in b.stderr and "forkserver" not in b.stderr
    # SIGTERM reaches the script; SIGINT too (KeyboardInterrupt: killed by SIGINT, as Python does).
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)):
        pid_file = tmp_path / "pid"
        pid_file.unlink(missing_ok=True)
        proc = subprocess.Popen(both(script, "wait", str(pid_file), env=env)[1], env=env, stderr=subprocess.PIPE)
        while not pid_file.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signum)
        proc.communicate(timeout=30)
        assert proc.returncode == code
    # The client killed (a timeout's SIGKILL): the command dies too.
    pid_file.unlink()
    proc = subprocess.Popen(both(script, "wait", str(pid_file), env=env)[1], env=env, stderr=subprocess.DEVNULL)
    while not pid_file.exists() or not pid_file.read_text():
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and os.path.exists(f"/proc/{child}") and "Z" not in _state(child):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}") or "Z" in _state(child)


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"
