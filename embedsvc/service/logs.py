"""Structured logs: one JSON object per line (or plain text), with any `extra` fields included."""

from __future__ import annotations

import json
import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ThirdPartyBelowInfo(logging.Filter):
    """Demotes other libraries' chatter to DEBUG: every INFO line not from an `embedsvc` logger (open_clip
    on the root logger, faiss's loader, uvicorn's start and stop), and the deprecation warnings of Ray and
    others (through `warnings`, captured as py.warnings, or their own loggers). They show with
    log_level=DEBUG and stay out of INFO logs; other libraries' real warnings and errors stay."""

    def __init__(self, threshold: int):
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if self._chatter(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.threshold

    @staticmethod
    def _chatter(record: logging.LogRecord) -> bool:
        if record.levelno <= logging.INFO:
            return record.name != "embedsvc" and not record.name.startswith("embedsvc.")
        if record.name == "py.warnings" or record.name.split(".")[0] == "ray":
            text = record.getMessage()
            return record.levelno <= logging.WARNING and (
                "Deprecat" in text or "deprecat" in text or "FutureWarning" in text
            )
        return False


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    handler.addFilter(ThirdPartyBelowInfo(root.level))
    logging.captureWarnings(True)  # warnings.warn(...) of libraries: logged (and filtered) like the rest
    logging.getLogger("embedsvc.rpc").setLevel(max(root.level, logging.INFO))
