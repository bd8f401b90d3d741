"""The suite's one way to run `embedsvc ...` as a user does: run_cli(*args) -> CompletedProcess.

In process (the default): `embedsvc.cli.main(argv)` runs in the test's process, as `python -m embedsvc` runs it,
but without a new interpreter importing torch, open_clip and faiss again (3-6 s a run on 2 cores). What a real
process shows is kept: stdout and stderr as text, the exit status (an argparse error's SystemExit(2), 130 for
Ctrl-C), an uncaught exception as its traceback on stderr and status 1, warnings printed once per place to stderr
under Python's default filters (pytest would record them instead), and the log lines `logging.basicConfig` writes
to stderr in a fresh process (pytest's handlers on the root logger would turn basicConfig into a no-op). Global
state main() changes is put back afterwards: the environment (apply_openmp_defaults), torch's and FAISS's thread
counts, logger levels and root handlers, the working directory, SIGINT/SIGTERM handlers, and models registered
with embedsvc or open_clip by the run (the test process's own registrations are visible during it).

process=True: a real `python -m embedsvc` child. Use it where the verdict depends on the process itself: kills and
signals, what runs at interpreter exit, serving (`serve` stays up until signalled; its start-up errors read
process state: the data-dir lock held by this test process, OpenMP variables read when torch loads), output written
by C code to the file descriptors, import-time behaviour (what a command imports, warnings at import), and
anything run in parallel with other commands or a server in this process that must not share its globals.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator, Mapping


def run_cli(
    *args: str,
    process: bool = False,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`embedsvc ARGS...` run to its end: returncode, stdout and stderr (text). `env` is the whole environment, as
    subprocess.run takes it (None: this process's); `timeout` bounds a child process only."""
    if process:
        return subprocess.run(
            [sys.executable, "-m", "embedsvc", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
        )
    return _run_in_process(list(args), cwd, env)


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


def _run_in_process(argv: list[str], cwd, env) -> subprocess.CompletedProcess:
    from embedsvc.cli import main

    stdout, stderr = _stream("strict"), _stream("backslashreplace")  # the encodings' errors of a child's pipes
    with _restored_globals(cwd, env), _fresh_warnings(stderr), _fresh_logging(stderr):
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
            sys.stdout.flush(), sys.stderr.flush()
            sys.stdout, sys.stderr = saved
    return subprocess.CompletedProcess(["embedsvc", *argv], code, _text(stdout), _text(stderr))


def _stream(errors: str) -> io.TextIOWrapper:
    """A text stream over bytes (it has .buffer, and isatty() is False as for a pipe)."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors=errors, write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    data = stream.buffer.getvalue()  # type: ignore[attr-defined]  # a BytesIO
    return data.decode("utf-8", "replace").replace("\r\n", "\n")  # as text=True reads a pipe


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
def _fresh_logging(stderr) -> Iterator[None]:
    """A root logger without handlers (basicConfig in main() then adds its stderr handler, as in a fresh process);
    the root's handlers and every existing logger's level put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    loggers = {name: lg for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    levels = {name: (lg.level, lg.disabled) for name, lg in loggers.items()}
    root.handlers = []
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers = handlers
        root.setLevel(level)
        for name, (lvl, disabled) in levels.items():
            loggers[name].setLevel(lvl)
            loggers[name].disabled = disabled


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
