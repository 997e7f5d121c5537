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
    _set_progress_bars(enabled=not quiet)
    # lm-eval warns about how we hand it the model (an in-memory model, our own num_fewshot) on every
    # run; the hub libraries warn about each retry before the one-line error losa gives when offline
    for chatty in ("lm_eval", "huggingface_hub", "datasets"):
        logging.getLogger(chatty).setLevel(logging.NOTSET if verbose else logging.ERROR)
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        warnings.filterwarnings("ignore", category=FutureWarning)


_QUIET: dict = {}  # while quiet: {"inits": {tqdm class: its own __init__}, "env": the TQDM_DISABLE it had}


def _set_progress_bars(enabled: bool) -> None:
    """Every tqdm bar off when quiet, also where the caller passes ``disable=`` itself (lm-eval
    does); back on for a later non-quiet setup. tqdm reads TQDM_DISABLE only at import, so the
    classes are patched."""
    import tqdm
    import tqdm.auto

    if enabled == (not _QUIET):  # already as asked
        return
    if enabled:
        for cls, init in _QUIET["inits"].items():
            cls.__init__ = init
        if _QUIET["env"] is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = _QUIET["env"]
        _QUIET.clear()
        return
    _QUIET.update(inits={}, env=os.environ.get("TQDM_DISABLE"))
    os.environ["TQDM_DISABLE"] = "1"
    for cls in {tqdm.tqdm, tqdm.auto.tqdm}:
        original = _QUIET["inits"][cls] = cls.__init__

        def quiet_init(self, *args, _original=original, **kwargs):
            kwargs["disable"] = True
            _original(self, *args, **kwargs)

        cls.__init__ = quiet_init
