"""The suite's one way to run `embedsvc ...` as a user does: run_cli(*args) -> CompletedProcess.

In process (the default): `embedsvc.cli.main(argv)` runs in the test's process, as `python -m embedsvc` runs it,
but without a new interpreter importing torch, open_clip and faiss again (3-6 s a run on 2 cores). What a real
process shows is kept: stdout and stderr as text, the exit status (an argparse error's SystemExit(2), 130 for
Ctrl-C), an uncaught exception as its traceback on stderr and status 1, warnings printed once per place to stderr
under Python's default filters (pytest would record them instead), and the log lines `logging.basicConfig` writes
to stderr in a fresh process (pytest's handlers on the root logger would turn basicConfig into a no-op). Global
state main() changes is put back afterwards: the environment (apply_openmp_defaults), torch's and FAISS's thread
counts, logger levels and root handlers, the working directory, SIGINT/SIGTERM handlers, and models registered
with embedsvc or open_clip by the run (the test process's own registrations are visible during it), and logging's
warning capture. A thread's uncaught exception prints its traceback on the run's stderr (Python's own hook, not
pytest's, which would record it as the test's warning). Threads that were running before the run (a fixture's
server) are no part of the command: what they write goes where it went.

process=True: a real `python -m embedsvc` child (start_cli: one left running). Use it where the verdict depends on
the process itself: kills and signals, memory limits, what runs at interpreter exit, a `serve` that is to keep
serving, start-up errors that read process state (the data-dir lock this test process may hold, OpenMP variables
read when torch loads), output written by C code to the file descriptors, import-time behaviour (what a command
imports, warnings at import), Ray, and commands run side by side. `serve` start-up errors that depend on none of
these (bad settings, a taken port, a full disk) run in process (serving.serve_once): a timeout's SIGINT stops
one that starts serving instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Mapping
from typing import Self


def run_cli(
    *args: str,
    process: bool = False,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`embedsvc ARGS...` run to its end: returncode, stdout and stderr (text). `env` is the whole environment, as
    subprocess.run takes it (None: this process's). Past `timeout` seconds, subprocess.TimeoutExpired: a child is
    killed; a run in process is sent SIGINT (Ctrl-C: a command stops, `serve` shuts down) when it runs on the main
    thread, so that a start-up error that regressed into serving fails the test instead of hanging it."""
    if process:
        return subprocess.run(
            [sys.executable, "-m", "embedsvc", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
        )
    return _run_in_process(list(args), cwd, env, timeout)


def start_cli(*args: str, **popen) -> subprocess.Popen:
    """`embedsvc ARGS...` as a child process left running (text pipes for stdout and stderr); `popen`: more
    subprocess.Popen arguments (env, cwd)."""
    return subprocess.Popen(
        [sys.executable, "-m", "embedsvc", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finished(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """A start_cli child waited for, in run_cli's shape."""
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run_in_process(argv: list[str], cwd, env, timeout: float) -> subprocess.CompletedProcess:
    from embedsvc.cli import main

    # a child's pipes: its locale's errors on stdout (strict, surrogateescape under C.UTF-8), backslashreplace on stderr
    stdout = _RunOutput(sys.stdout, getattr(sys.__stdout__, "errors", None) or "strict")
    stderr = _RunOutput(sys.stderr, "backslashreplace")
    watchdog = _Watchdog(timeout)
    try:
        with _restored_globals(cwd, env), _fresh_warnings(stderr), _fresh_logging(), _fresh_hooks(), watchdog:
            saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = stdout, stderr
            try:
                code = main(argv)
            except SystemExit as exc:  # argparse's errors and --help
                code = _exit_status(exc.code, stderr)
            except Exception:  # noqa: BLE001 - uncaught: Python prints the traceback and exits 1
                traceback.print_exc(file=stderr)
                code = 1
            finally:
                sys.stdout, sys.stderr = saved
    except KeyboardInterrupt:
        if not watchdog.fired:
            raise
    if watchdog.fired:
        raise subprocess.TimeoutExpired(["embedsvc", *argv], timeout, stdout.text(), stderr.text())
    return subprocess.CompletedProcess(["embedsvc", *argv], code, stdout.text(), stderr.text())


class _Watchdog:
    """Sends SIGINT to the main thread if the run outlives `timeout` (on the main thread only: elsewhere a run is
    not bounded). Python's own SIGINT handler is installed meanwhile (_restored_globals puts the old one back)."""

    def __init__(self, timeout: float):
        self.timeout, self.fired, self.lock, self.running = timeout, False, threading.Lock(), False
        self.timer: threading.Timer | None = None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.running = True
            self.timer = threading.Timer(self.timeout, self._fire)
            self.timer.daemon = True
            self.timer.start()
        return self

    def _fire(self) -> None:
        with self.lock:
            if self.running:
                self.fired = True
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def __exit__(self, *exc) -> None:
        with self.lock:
            self.running = False
        if self.timer is not None:
            self.timer.cancel()


class _RunOutput(io.TextIOBase):
    """sys.stdout or sys.stderr during a run: what the run writes is kept (as text over bytes, with .buffer, not a
    tty, as a pipe); threads of the test process that were running before it (a fixture's server, whose log lines
    would reach basicConfig's handler) write where they wrote before, as they are no part of the command."""

    def __init__(self, before, errors: str):
        self.kept = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=errors, write_through=True)
        self.before = before
        self.others = set(threading.enumerate()) - {threading.current_thread()}

    def _stream(self):
        return self.before if threading.current_thread() in self.others else self.kept

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def writable(self) -> bool:
        return True

    @property
    def buffer(self):
        return self.kept.buffer

    @property
    def encoding(self) -> str:
        return self.kept.encoding

    @property
    def errors(self) -> str | None:
        return self.kept.errors

    def text(self) -> str:
        """What the run wrote, decoded as text=True reads a pipe."""
        self.kept.flush()
        return self.kept.buffer.getvalue().decode("utf-8", "replace").replace("\r\n", "\n")  # type: ignore[attr-defined]


def _exit_status(code, stderr) -> int:
    """What `sys.exit(code)` leaves as a process's status: None 0, an int itself, anything else printed, 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=stderr)
    return 1


@contextlib.contextmanager
def _fresh_warnings(stderr) -> Iterator[None]:
    """Python's default warning filters, and warnings printed to `stderr` (first per place, as `default` does:
    changing the filters forgets which places were shown before)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("ignore", category=ResourceWarning)
        warnings.filterwarnings("ignore", category=ImportWarning)
        warnings.filterwarnings("ignore", category=PendingDeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")

        def show(message, category, filename, lineno, file=None, line=None):
            stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        yield


@contextlib.contextmanager
def _fresh_hooks() -> Iterator[None]:
    """Python's own hooks for a thread's uncaught exception and an unraisable one: they print the traceback to
    sys.stderr (the run's), where pytest's would record it as a warning of the test instead."""
    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook
    threading.excepthook, sys.unraisablehook = threading.__excepthook__, sys.__unraisablehook__
    try:
        yield
    finally:
        threading.excepthook, sys.unraisablehook = thread_hook, unraisable_hook


@contextlib.contextmanager
def _fresh_logging() -> Iterator[None]:
    """Logging as a fresh process has it: a root logger at WARNING without handlers (basicConfig in main() then adds
    its stderr handler), embedsvc's loggers at NOTSET; the root's handlers and every logger's level put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # logging.captureWarnings(True) (serve's configure_logging) keeps the showwarning it replaced; left set, a later
    # run's captureWarnings(True) would do nothing and its warnings would not reach its log handler
    captured = logging._warnings_showwarning  # type: ignore[attr-defined]
    logging._warnings_showwarning = None  # type: ignore[attr-defined]
    # placeholders (a parent name such as "embedsvc", not yet a logger) become loggers at NOTSET, as they were
    levels = {
        name: (lg.level, lg.disabled) if isinstance(lg, logging.Logger) else (logging.NOTSET, False)
        for name, lg in logging.root.manager.loggerDict.items()
    }
    root.handlers = []
    root.setLevel(logging.WARNING)
    for name, logger in logging.root.manager.loggerDict.items():  # ours set no level at import
        if isinstance(logger, logging.Logger) and name.split(".")[0] == "embedsvc":
            logger.setLevel(logging.NOTSET)
    try:
        yield
    finally:
        logging._warnings_showwarning = captured  # type: ignore[attr-defined]
        for handler in root.handlers:
            handler.close()
        root.handlers = handlers
        root.setLevel(level)
        for name, (lvl, disabled) in levels.items():
            logger = logging.root.manager.loggerDict[name]
            if isinstance(logger, logging.Logger):
                logger.setLevel(lvl)
                logger.disabled = disabled


@contextlib.contextmanager
def _restored_globals(cwd, env) -> Iterator[None]:
    """Runs with `cwd` and `env` if given; puts back what main() may change in the process."""
    import faiss  # imported before the run, so that their state can be put back
    import open_clip.factory as architectures
    import torch

    from embedsvc.models import MODEL_REGISTRY

    environ, directory = dict(os.environ), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads, omp_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    models, configs, paths = (
        dict(MODEL_REGISTRY),
        dict(architectures._MODEL_CONFIGS),
        architectures._MODEL_CONFIG_PATHS[:],
    )
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(directory)
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(omp_threads)
        MODEL_REGISTRY.clear()
        MODEL_REGISTRY.update(models)
        architectures._MODEL_CONFIGS = configs  # add_model_config changes it in place, then rebinds it
        architectures._MODEL_CONFIG_PATHS[:] = paths
