"""DVC's stage commands in the end-to-end tests, forked from a process that imported the stages'
libraries once: the seconds of `import torch` (and its compiler stack, albumentations, matplotlib)
paid once per test worker instead of once per stage of every `dvc repro` and `dvc exp run`.

`dvc.yaml` runs each stage as `python stages/<name>.py`, through a shell that finds `python` on
PATH. `tool_env()` puts a folder first on PATH whose `python` is the client below (`CLIENT`, written
out by `write_client` with this interpreter in its `#!` line and `-S`, so it starts in milliseconds):

- For `python stages/<name>.py [args]` it connects to this module's server (`serve`, one per test
  worker, its socket in `SOCKET_ENV`) and hands over its stdin, stdout and stderr, its working
  directory, environment and arguments. The server forks a child that runs the script as
  `tests/stage_fork.py` runs one (`run_as_script`): the stage's own code is imported fresh from
  the working directory, output goes straight to the descriptors DVC gave the client.
- SIGINT, SIGTERM and SIGHUP sent to the client go on to the child; the client exits as the child
  did (its code, or killed by the same signal), so DVC sees what it would of a subprocess. If the
  client dies (SIGKILL), the server kills the child.
- Anything else (`python -c ...`, `python -m ...`, no server) runs the real interpreter (exec).

What this does not give: the child is the server's, not in DVC's process group, so the tests that
signal process groups or look at the process tree (`tests/e2e/test_interrupt.py`, the queue
recovery and SLURM tests) run their stages as real subprocesses (`REAL_PROCESSES` in conftest).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback

SOCKET_ENV = "CIFARLAB_TEST_STAGE_SERVER"
HEADER = struct.Struct("!I")

# Run by `#!<python> -S` (no site-packages: the standard library only); `{python}` is filled in.
CLIENT = r'''#!{python} -S
"""`python` for the tests' DVC stages: `python stages/X.py` runs forked in the test worker's stage
server (tests/stage_server.py); anything else runs {python}."""
import json, os, signal, socket, struct, sys

REAL, ADDRESS = {python!r}, os.environ.get({socket_env!r})
args = sys.argv[1:]
if not (ADDRESS and args and args[0].startswith("stages/") and args[0].endswith(".py")):
    os.execv(REAL, [REAL, *args])
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    client.connect(ADDRESS)
except OSError:                           # no server (it has gone): run the stage as a subprocess would
    os.execv(REAL, [REAL, *args])
request = json.dumps({{"args": args, "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
socket.send_fds(client, [struct.pack("!I", len(request))], [0, 1, 2])
client.sendall(request)
reader = client.makefile("r")
child = int(reader.readline())
def forward(signum, frame):
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, forward)
while True:
    try:
        line = reader.readline()
        break
    except InterruptedError:
        continue
kind, _, value = line.partition(" ")
if kind == "signal":
    signal.signal(int(value), signal.SIG_DFL)
    os.kill(os.getpid(), int(value))
sys.exit(int(value) if kind == "exit" else 1)
'''


def write_client(folder: str) -> str:
    """The client as `folder/python`, executable; returns the folder (for the front of PATH)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "python")
    with open(path, "w") as handle:
        handle.write(CLIENT.format(python=sys.executable, socket_env=SOCKET_ENV))
    os.chmod(path, 0o755)
    return folder


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    while len(head) < HEADER.size:
        head += conn.recv(HEADER.size - len(head))
    (size,) = HEADER.unpack(head)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the client went away mid-request")
        body += chunk
    return json.loads(body), fds


def _child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python <args>` with the client's descriptors; never returns."""
    import stage_fork

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    code = 0
    try:
        stage_fork.run_as_script(request["args"][0], request["cwd"], request["env"], request["args"][1:])
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:             # uncaught, as the interpreter ends: killed by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(address: str) -> None:
    """Preload the stages' libraries, then fork a child per client connection until the parent
    (the test worker) exits. Single-threaded: a child is forked from a process with no threads."""
    import stage_fork

    for name in stage_fork.PRELOAD:
        __import__(name)
    parent = os.getppid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".new")
    os.rename(address + ".new", address)         # clients see the socket only once it listens
    listener.listen(16)
    children: dict[socket.socket, int] = {}
    while os.getppid() == parent:
        readable, _, _ = select.select([listener, *children], [], [], 0.05)
        for conn in readable:
            if conn is listener:
                client, _ = listener.accept()
                try:
                    request, fds = _read_request(client)
                except (OSError, ValueError):
                    client.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    listener.close()
                    for other in (*children, client):
                        other.close()
                    _child(request, fds)
                for fd in fds:
                    os.close(fd)
                client.sendall(f"{pid}\n".encode())
                children[client] = pid
            elif not conn.recv(1):                  # the client died: so does its stage
                try:
                    os.kill(children[conn], signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _reap(children)
    for pid in children.values():
        os.kill(pid, signal.SIGKILL)


def _reap(children: dict[socket.socket, int]) -> None:
    """Tell each client whose child has ended how it ended, and forget it."""
    by_pid = {pid: conn for conn, pid in children.items()}
    while by_pid:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = by_pid.pop(pid, None)
        if conn is None:
            continue
        message = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        try:
            conn.sendall(f"{message}\n".encode())
        except OSError:
            pass
        conn.close()
        del children[conn]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    serve(sys.argv[1])
