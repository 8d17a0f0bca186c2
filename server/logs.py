"""Logging for ``courier serve``: one configuration for the server and every worker, and no
secret in any line.

The configuration is a ``logging.config.dictConfig`` dict handed to uvicorn (``log_config``),
so uvicorn applies it in each worker process too: Courier's own ``courier.*`` lines appear
under ``--workers N`` as well. Every handler carries ``RedactSecrets``, which replaces the
value of any ``token=`` query parameter and of any ``Bearer`` credential with ``<redacted>``
(uvicorn logs the WebSocket path with its query string, and the access log logs every URL).
"""

from __future__ import annotations

import logging
import re
from typing import Any

_SECRET = re.compile(r"(?i)((?:[?&]|\b)(?:token|access_token|key)=|bearer\s+)[^\s&\"']+")


def redact(text: str) -> str:
    """``text`` with every query-string token and bearer credential replaced."""
    return _SECRET.sub(r"\1<redacted>", text)


class RedactSecrets(logging.Filter):
    """Redacts the message and each string argument (uvicorn's access formatter reads its
    fields from the arguments, so they stay arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


_JSON = {
    "()": "pythonjsonlogger.json.JsonFormatter",
    "fmt": "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
    "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
}
"""One JSON object per line (``time``, ``level``, ``logger``, ``process``, ``message``, and
``exc_info`` with the traceback of an error): for log drains that parse lines."""


def log_config(level: str, fmt: str = "text") -> dict[str, Any]:
    """The ``dictConfig`` for uvicorn and Courier at ``level`` (``info``, ``debug``, ...);
    ``fmt`` is ``text`` (for people) or ``json`` (for log drains)."""
    level = level.upper()
    redacting = ["redact"]
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "server.logs.RedactSecrets"}},
        "formatters": {"default": _JSON, "access": _JSON, "courier": _JSON}
        if fmt == "json"
        else {
            "default": {
                "()": "uvicorn.logging.DefaultFormatter",
                "fmt": "%(levelprefix)s %(message)s",
                "use_colors": None,
            },
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
            "courier": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        },
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": redacting,
            },
            "access": {
                "formatter": "access",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "filters": redacting,
            },
            "courier": {
                "formatter": "courier",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": redacting,
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["access"], "level": level, "propagate": False},
            "courier": {"handlers": ["courier"], "level": level, "propagate": False},
            "alembic": {"handlers": ["courier"], "level": "WARNING", "propagate": False},
        },
    }
