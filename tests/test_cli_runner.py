"""tests/cli_runner.py's run in process keeps what a fresh `python -m embedsvc` shows: these guard the places where
the test process's own state (pytest's hooks, what an earlier run left) would make a run look otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import warnings

from cli_runner import _RunOutput
from serving import serve_once


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_serve_run_leaves_warning_capture_as_it_found_it(tmp_path):
    """serve's logging.captureWarnings(True) left set made the next one a no-op: that run's warnings were printed
    raw instead of logged (JSON, filtered) as in a process of its own."""
    tokens = tmp_path / "tokens.json"
    tokens.write_text("not json")
    for _ in range(2):  # configure_logging runs, then the tokens file fails the start
        proc = serve_once("--data-dir", str(tmp_path / "d"), "--auth-tokens-file", str(tokens))
        assert proc.returncode == 2 and "not JSON" in proc.stderr, proc.stderr
    records, logger = _Records(), logging.getLogger("py.warnings")
    logger.addHandler(records)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logging.captureWarnings(True)  # what the next serve run's configure_logging does
            try:
                warnings.warn("reaches the log", UserWarning, stacklevel=1)
            finally:
                logging.captureWarnings(False)
    finally:
        logger.removeHandler(records)
    assert any("reaches the log" in m for m in records.messages), records.messages


def test_a_thread_s_uncaught_exception_is_printed_on_the_run_s_stderr():
    """In a process, a thread's uncaught exception prints its traceback on stderr; pytest's threading.excepthook
    would record it as a warning of the test instead, and a test asserting no traceback would pass."""
    from cli_runner import _fresh_hooks

    stderr = _RunOutput(sys.stderr, "backslashreplace")
    saved, sys.stderr = sys.stderr, stderr
    try:
        with _fresh_hooks():
            thread = threading.Thread(target=lambda: 1 / 0, name="run-thread")
            thread.start()
            thread.join(60)
    finally:
        sys.stderr = saved
    assert not thread.is_alive()
    text = stderr.text()
    assert "Traceback" in text and "ZeroDivisionError" in text and "run-thread" in text, text
