"""Silence the libraries while an item runs, so a failing item's report holds only its own message."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """No log records, no warnings and no progress bars while an item runs.

    Every example would repeat them (loader notes, prompt truncation, one guard line per incident,
    the import-time notes of quantization back-ends) into a failing item's captured output; the
    item's own message says what matters, once.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    saved = [(library.get_verbosity(), library.is_progress_bar_enabled()) for library in libraries]
    disabled = logging.root.manager.disable
    for library in libraries:
        library.set_verbosity_error()
        library.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        for library, (verbosity, progress_bar) in zip(libraries, saved, strict=True):
            library.set_verbosity(verbosity)
            if progress_bar:
                library.enable_progress_bar()
