"""The command's stderr: the progress bar, and the guard's log lines and warnings each on a line of their own.

diffusers draws its progress bar on stderr and rewrites it in place with ``\\r``; the guard logs
an incident during a step, and a logging handler or ``warnings`` would write it right after the
bar's last character, on the bar's line. Here the bar writes through ``BarStream``, which knows
whether the bar's line is unfinished, and every other line goes through ``BarStream.line``: on a
terminal through ``tqdm.write`` (the bar is cleared, the line printed, the bar redrawn below it),
elsewhere (a pipe, a log file, CI) after a newline that ends the bar's line.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

from .inputs import in_command_terms

# Every logger of this package lives under diffusers' (guard.py: ``diffusers.guarded_diffusers.core.guard``).
GUARD_LOGGER = "diffusers.guarded_diffusers"


class BarStream:
    """A text stream for tqdm that remembers whether the bar left its line unfinished."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.mid_line = False

    def write(self, text: str) -> int:
        if text:
            self.mid_line = not text.endswith("\n")
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    @property
    def encoding(self) -> str | None:  # tqdm draws Unicode blocks only where the stream can hold them
        return getattr(self.stream, "encoding", None)

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:  # tqdm reads the terminal's width through it
        return self.stream.fileno()

    def line(self, text: str) -> None:
        """``text`` on a line of its own, never on the progress bar's."""
        if self.isatty():
            tqdm.write(text, file=self)
        else:
            if self.mid_line:
                self.write("\n")
            self.write(text + "\n")
        self.flush()


class _LineHandler(logging.Handler):
    def __init__(self, out: BarStream) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.out.line(in_command_terms(self.format(record)))
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def guard_lines(out: BarStream, command: str) -> Iterator[None]:
    """Within: the guard's warnings (log and ``warnings``) reach ``out`` line by line, in the command's terms.

    The guard's incidents are logged at WARNING as they happen; library chatter stays at the
    level ``demo.quiet`` set. A warning from the guard (``DegradedFixWarning``) reads
    ``fluxguard fill: warning: ...``; any other warning keeps Python's format.
    """
    logger = logging.getLogger(GUARD_LOGGER)
    handler = _LineHandler(out)
    saved = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(handler)

    def show(message: Any, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any) -> None:
        text = str(message)
        if text.startswith("guarded_diffusers: "):
            out.line(
                f"fluxguard {command}: warning: {in_command_terms(text.removeprefix('guarded_diffusers: '))}"
            )
        else:
            out.line(warnings.formatwarning(message, category, filename, lineno).rstrip("\n"))

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
