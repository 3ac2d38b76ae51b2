"""The real ``gemini-sim`` command line, run many times without paying its start-up each time.

``python -m gemini_sim.cli`` spends about 0.6 s (more on a busy 2-core machine) importing before it reads a flag, and
the tests run it several hundred times. Here one server process imports the package once; every run is a process of
its own forked from it, with the run's own stdout, stderr, working folder and limits (wall time and, where asked,
address space) and the caller's environment, as a subprocess would have. A child exits with the code ``python -m
gemini_sim.cli`` would: what ``main`` returns, SystemExit's code, or 1 with the traceback for an exception that
escapes it.

Run as a script, this file is the server: one JSON request per line on stdin, one JSON reply per line on stdout.
"""

import importlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path


def _child(req: dict, out, err) -> None:
    """In the forked process: run one command line, then leave without running the server's exit handlers."""
    rc = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)  # the server's stdin carries its requests
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        if req["address_space"]:
            resource.setrlimit(resource.RLIMIT_AS, (req["address_space"], req["address_space"]))
        from gemini_sim.cli import main

        rc = main(req["argv"])
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(rc if isinstance(rc, int) and 0 <= rc < 256 else 1)


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), False
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), True
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def serve() -> None:
    importlib.import_module("gemini_sim.cli")  # once, here, for every run

    for line in sys.stdin:
        req = json.loads(line)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                _child(req, out, err)
            rc, timed_out = _wait(pid, req["timeout"])
            out.seek(0)
            err.seek(0)
            reply = {"rc": rc, "timed_out": timed_out, "stdout": out.read().decode(errors="replace"),
                     "stderr": err.read().decode(errors="replace")}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class Runner:
    """The client: starts the server on first use (again if it died) and sends it one command line at a time."""

    def __init__(self):
        self.proc = None

    def run(self, argv, cwd, timeout: float, address_space: int | None = None) -> subprocess.CompletedProcess:
        argv = [str(a) for a in argv]
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         cwd=cwd, text=True)
        req = {"argv": argv, "cwd": str(cwd), "timeout": timeout, "address_space": address_space,
               "env": dict(os.environ)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the command-line server died running {argv}")
        reply = json.loads(line)
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(["gemini-sim", *argv], timeout, reply["stdout"], reply["stderr"])
        return subprocess.CompletedProcess(["gemini-sim", *argv], reply["rc"], reply["stdout"], reply["stderr"])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    serve()
