"""Command lines of this project's Python tools, run as processes forked from a Python that has already imported
torch and MONAI.

``python -m monai.bundle run ...`` spends about 7 s of CPU importing torch and MONAI (``import monai`` loads all of its
sub-packages) before it reads a config, and the suite starts a few hundred such commands. This module starts, per test
worker and interpreter (this one, or a virtual environment's), one Python that imports those third-party packages once
(never this repository's code) and forks a process for each command. The child gets the command's arguments, working
folder, environment, ``sys.path`` (the module's or script's folder first, then ``PYTHONPATH``, then the interpreter's
own), standard streams and exit status, and runs ``-m <module>``, ``-c <code>`` or ``<script>`` as ``__main__`` the way
the interpreter does, its exit functions included. Settings an interpreter reads as it starts (thread counts, a
preloaded allocator, ``PYTHON*`` flags: :data:`STARTUP_VARIABLES`) are those its pre-imported Python was started with:
commands that differ in them are forked from Pythons of their own. Commands of other programs, and every command of the
tests that run the READMEs' command lines as typed (:data:`fresh_interpreters`, set by conftest.py), run as ordinary
subprocesses.

Run as a script, this file is that pre-imported Python: it reads one JSON request a line on standard input, answers
``{"pid": ...}`` once it has forked, and ``{"exit": pid, "code": ...}`` when a child ends (``subprocess``'s return
code: negative for a signal).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRELOAD = ("torch", "monai", "monai.bundle.scripts", "fire", "nibabel", "ignite")
# variables read when an interpreter, torch's thread pool (GNU OpenMP) or the C allocator start. Intel OpenMP's KMP_*
# are not among them: scikit-learn sets two at import, and torch's CPU wheel does not use that runtime.
STARTUP_VARIABLES = ("LD_", "MALLOC_", "OMP_", "GOMP_", "MKL_", "OPENBLAS_", "PYTHON", "TORCH", "PYTORCH", "CUDA")


def start_up_settings(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The variables of ``env`` an interpreter reads as it starts (:data:`STARTUP_VARIABLES`, but ``PYTHONPATH``,
    which each child sets for itself): commands that differ in them are forked from Pythons of their own."""
    return tuple(sorted((k, v) for k, v in env.items() if k.startswith(STARTUP_VARIABLES) and k != "PYTHONPATH"))


class ForkedProcess:
    """One command run by the pre-imported Python: the part of :class:`subprocess.Popen` the tests use."""

    def __init__(self, server: PreloadedPython, args: list[str], pid: int, stdout: Path, stderr: Path):
        self.server, self.args, self.pid, self.returncode = server, args, pid, None
        self._stdout, self._stderr = stdout, stderr

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            code = self.server.exit_code(self.pid, timeout)
            if code is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = code
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait()
            raise
        outputs = (self._stdout.read_bytes(), self._stderr.read_bytes())
        for path in (self._stdout, self._stderr):
            path.unlink()
        return outputs[0].decode(errors="replace"), outputs[1].decode(errors="replace")


class PreloadedPython:
    """The client side: starts the pre-imported Python (lazily) and asks it for processes."""

    def __init__(self, interpreter: str, env: dict[str, str]) -> None:
        self._interpreter = interpreter
        self._server: subprocess.Popen | None = None
        self._env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        self._exits: dict[int, int] = {}
        self._buffer = b""
        self._folder = Path(tempfile.mkdtemp(prefix="preloaded_python_"))
        atexit.register(self.close)

    def close(self) -> None:
        """End the pre-imported Python (its running children finish on their own) and remove the output files."""
        if self._server is not None and self._server.poll() is None:
            self._server.stdin.close()
            self._server.wait(timeout=60)
        shutil.rmtree(self._folder, ignore_errors=True)

    def _start(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen(
                [self._interpreter, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self._env
            )
            ready = self._message(timeout=300)
            assert ready == {"ready": True}, f"the pre-imported Python did not start: {ready}"
        return self._server

    def _message(self, timeout: float | None) -> dict | None:
        """The next line from the server, or None when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._server.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self._server.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the pre-imported Python ended (exit status {self._server.wait()})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s return code once it has ended, or None when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self._exits:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self._message(left)
            if message is None:
                return None
            self._exits[message["exit"]] = message["code"]
        return self._exits.pop(pid)

    def _output_file(self, suffix: str) -> Path:
        descriptor, path = tempfile.mkstemp(dir=self._folder, suffix=suffix)
        os.close(descriptor)
        return Path(path)

    def popen(self, args: list[str], cwd: str | Path | None, env: dict[str, str]) -> ForkedProcess:
        """Have the server fork a process for ``args``, run from ``cwd`` with ``env``, its output into files."""
        server = self._start()
        stdout, stderr = self._output_file(".out"), self._output_file(".err")
        request = {
            "args": [str(a) for a in args],
            "cwd": str(Path(cwd or os.getcwd()).resolve()),
            "env": env,
            "stdout": str(stdout),
            "stderr": str(stderr),
        }
        server.stdin.write(json.dumps(request).encode() + b"\n")
        server.stdin.flush()
        message = self._message(timeout=60)
        while "exit" in message:  # an earlier child's end, reported before this answer
            self._exits[message["exit"]] = message["code"]
            message = self._message(timeout=60)
        return ForkedProcess(self, list(args), message["pid"], stdout, stderr)


# one pre-imported Python per interpreter and set of start-up settings, in this process; beyond MAX_SERVERS, new
# interpreters
_servers: dict[tuple[str, tuple[tuple[str, str], ...]], PreloadedPython] = {}
MAX_SERVERS = 5
# set by conftest.py for each test: the tests that run the READMEs' command lines as typed start new interpreters
fresh_interpreters = False


def _server_key(args: list[str], env: dict[str, str] | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The pre-imported Python a command is forked from: its interpreter and start-up settings."""
    return args[0], start_up_settings(dict(os.environ if env is None else env))


def why_fresh(args: list, env: dict[str, str] | None = None) -> str | None:
    """Why :func:`popen` starts ``args`` in a new interpreter, or None where it forks it."""
    args = [str(a) for a in args]
    if fresh_interpreters:
        return "this test runs the READMEs' command lines as typed"
    forms = len(args) >= 3 and args[1] in ("-m", "-c") or len(args) >= 2 and args[1].endswith(".py")
    if not Path(args[0]).name.startswith("python") or not forms:
        return "not python -m/-c/<script>"
    if _server_key(args, env) not in _servers and len(_servers) >= MAX_SERVERS:
        return f"{MAX_SERVERS} pre-imported Pythons of other interpreters or start-up settings run already"
    return None


def popen(args: list, cwd: str | Path | None = None, env: dict[str, str] | None = None):
    """Start ``args`` with its output captured as text: a process forked from the pre-imported Python of its
    start-up settings where the command allows (see the module's docstring), an ordinary :class:`subprocess.Popen`
    otherwise."""
    args = [str(a) for a in args]
    if why_fresh(args, env) is None:
        environment = dict(os.environ if env is None else env)
        key = _server_key(args, environment)
        if key not in _servers:
            _servers[key] = PreloadedPython(args[0], environment)
        return _servers[key].popen(args, cwd=cwd, env=environment)
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list, cwd: str | Path | None = None, env: dict[str, str] | None = None, timeout: float | None = None):
    """:func:`subprocess.run` with ``capture_output=True, text=True``, started by :func:`popen`."""
    process = popen(args, cwd=cwd, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# --- the server -------------------------------------------------------------------------------------------------------


def _child(request: dict, base_path: list[str], server_fds: tuple[int, ...]) -> None:
    """In the forked process: become the requested command, run it, exit the way the interpreter would."""
    import importlib
    import runpy
    import threading
    import types

    signal.set_wakeup_fd(-1)
    for fd in server_fds:
        os.close(fd)
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_TRUNC), fd)
    args = request["args"][1:]
    option = args[0] if args[0] in ("-m", "-c") else None
    first = {"-m": request["cwd"], "-c": ""}.get(option) if option else str(Path(args[0]).resolve().parent)
    extra = [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *base_path]
    importlib.invalidate_caches()
    code, interrupted = 0, False
    try:
        if option == "-m":
            sys.argv = ["-m", *args[2:]]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        elif option == "-c":
            sys.argv = ["-c", *args[2:]]
            main = sys.modules["__main__"] = types.ModuleType("__main__")
            exec(compile(args[1], "<string>", "exec"), main.__dict__)
        else:
            sys.argv = args[:]
            runpy.run_path(args[0], run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        interrupted = True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # what the interpreter does at exit: wait for threads, then the exit functions
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if interrupted:  # as the interpreter ends on an uncaught KeyboardInterrupt: by the signal itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _serve() -> None:
    import threading

    for name in PRELOAD:
        __import__(name)
    repo = str(Path(__file__).resolve().parents[1])
    files = {name: getattr(module, "__file__", None) or "" for name, module in sys.modules.items()}
    files = {name: file for name, file in files.items() if name not in ("__main__", "__mp_main__")}
    installed = tuple(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))  # the checkout's .venv too
    own = [name for name, file in files.items() if file.startswith(repo) and not file.startswith(installed)]
    # no Python thread but this one (the native pools numpy's OpenBLAS and pyarrow's jemalloc start at import have
    # fork handlers of their own, as every forked DataLoader worker relies on); none of the repository's code imported
    threads = [thread.name for thread in threading.enumerate()]
    if own or threads != ["MainThread"]:
        print(json.dumps({"ready": False, "own_modules": own, "threads": threads}), flush=True)
        return
    base_path = sys.path[1:]
    out = sys.stdout.buffer
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal is for the tests and their commands
    out.write(b'{"ready": true}\n')
    out.flush()
    pending = b""
    while True:
        readable = select.select([0, wake_read], [], [])[0]
        if wake_read in readable:
            os.read(wake_read, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            out.write(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
            out.flush()
        if 0 not in readable:
            continue
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            pid = os.fork()
            if pid == 0:
                try:
                    _child(json.loads(line), base_path, (wake_read, wake_write))
                finally:
                    os._exit(70)
            out.write(json.dumps({"pid": pid}).encode() + b"\n")
            out.flush()


if __name__ == "__main__":
    _serve()
