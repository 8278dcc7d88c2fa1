"""`python <script> args...` without paying for the interpreter's start each time: a server that has
imported the heavy libraries (torch, torchvision, Lightning, Hydra; never this project) forks a
child per command, which runs the script as `python <script>` would (its argv, working directory,
environment, standard streams, `__main__`). Each command is started as a real process, a small client
(`python -S forkserver.py run SOCKET SCRIPT ARGS...`): it hands its standard streams and request to the
server, forwards the signals it gets to the child and exits as the child did, so a caller sees an
ordinary `subprocess.Popen`. If the client dies (a timeout's SIGKILL), the server kills the child.

Only the standard library is imported at the top: the client starts in milliseconds.
"""

import json
import os
import signal
import socket
import struct
import sys

# Libraries that take seconds to import and keep nothing per process. Not W&B: it makes temporary
# directories as it is imported, which the first child to exit would delete for all the others.
HEAVY = ("torch", "torchvision", "lightning", "hydra", "omegaconf", "PIL.Image", "numpy", "matplotlib")
THREADS = 3  # the server's exit status where importing started threads (OMP_NUM_THREADS above 1)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)


def send_request(conn: socket.socket, request: dict, fds: list[int]):
    payload = json.dumps(request).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(payload))], fds)
    conn.sendall(payload)


def receive_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def client(socket_path: str, argv: list[str]):
    """Run `argv` (script and arguments) in a child of the server; exit as it did."""
    # Signals wait until the child's pid is known: one sent as soon as the child runs reaches it.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(socket_path)
    send_request(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
    (pid,) = struct.unpack("!q", receive_exactly(conn, 8))
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: os.kill(pid, signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    (code,) = struct.unpack("!q", receive_exactly(conn, 8))
    if code < 0:  # killed by a signal: die of it too, as Popen's returncode then says
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def serve(socket_path: str) -> tuple[dict, list[int]]:
    """Import the heavy libraries, then fork a child per request; the request and its streams, in the child."""
    import gc
    import importlib
    import selectors

    for name in HEAVY:
        importlib.import_module(name)
    gc.freeze()  # the children's collections skip what the server holds (and leave its pages shared)
    if len(os.listdir("/proc/self/task")) != 1:  # forking a process with threads is not safe
        sys.exit(THREADS)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path + ".tmp")
    server.listen(16)
    os.rename(socket_path + ".tmp", socket_path)  # the path appears once the server accepts
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    children = {}  # the client's connection -> its child's pid
    parent = os.getppid()
    while os.getppid() == parent:  # ends with the tests that started it
        for key, _ in selector.select(timeout=0.05):
            conn = key.fileobj
            if conn is server:
                conn, _ = server.accept()
                header, fds, _, _ = socket.recv_fds(conn, 8, 3)
                request = json.loads(receive_exactly(conn, struct.unpack("!Q", header)[0]))
                pid = os.fork()
                if pid == 0:
                    selector.close()
                    for other in (server, conn, *children):
                        other.close()
                    return request, fds
                for fd in fds:
                    os.close(fd)
                conn.sendall(struct.pack("!q", pid))
                children[conn] = pid
                selector.register(conn, selectors.EVENT_READ)
            else:  # the client closed its end early: it died, so its command dies too
                os.kill(children[conn], signal.SIGKILL)
                selector.unregister(conn)
        for conn, pid in list(children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del children[conn]
                if conn.fileno() in selector.get_map():
                    selector.unregister(conn)
                try:
                    conn.sendall(struct.pack("!q", os.waitstatus_to_exitcode(status)))
                except OSError:  # the client is gone
                    pass
                conn.close()
    sys.exit(0)


def become(request: dict, fds: list[int]):
    """Turn this child into `python <script> args...` started with the request's streams, directory and
    environment."""
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.realpath(sys.argv[0]))


def run_script() -> int:
    """Run the script as `python <script>` does, to its exit status; the interpreter's end, up to the
    atexit handlers (threads joined, handlers run, streams flushed), is left to `finish`."""
    import runpy

    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            return exit.code or 0
        print(exit.code, file=sys.stderr)
        return 1
    except BaseException as error:  # printed as Python prints it, from the script's frame on
        tb = error.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            tb = tb.tb_next
        sys.excepthook(type(error), error.with_traceback(tb), tb)
        return -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1


def finish(code: int):
    """End as the interpreter ends, without tearing down every module one by one (seconds with torch
    loaded, and nothing a test can see): non-daemon threads joined, atexit handlers, streams flushed."""
    import atexit
    import gc
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    gc.collect()  # objects in cycles get their __del__, as at the interpreter's end
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1] == "run":
        client(sys.argv[2], sys.argv[3:])
    else:
        become(*serve(sys.argv[2]))
        finish(run_script())
