"""One logging setup for the CLI and scripts."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (it may be replaced, e.g. by test capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    if int(os.environ.get("RANK", "0")) > 0:  # a distributed launch: only the main process talks
        quiet = True
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if quiet:  # progress bars off too (tqdm reads TQDM_DISABLE only at import, so patch the class)
        from functools import partialmethod

        import tqdm
        import tqdm.auto

        os.environ["TQDM_DISABLE"] = "1"
        for cls in {tqdm.tqdm, tqdm.auto.tqdm}:
            cls.__init__ = partialmethod(cls.__init__, disable=True)
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        warnings.filterwarnings("ignore", category=FutureWarning)
