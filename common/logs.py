"""Logging set-up (called only by the CLI) with credential redaction on every record."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

_CRED_RE = re.compile(r"(rediss?://)([^:@/\s]*):([^@\s]+)@")


class RedactCredentials(logging.Filter):
    """Masks ``redis://user:password@`` in any log line, whatever module wrote it."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "://" in msg and "@" in msg:
            record.msg = _CRED_RE.sub(r"\1\2:***@", msg)
            record.args = None
        return True


def setup_logging(level: str = "INFO", log_file: Path | None = None, name: str = "gspo") -> None:
    fmt = logging.Formatter(f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(fmt)
        h.addFilter(RedactCredentials())
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
