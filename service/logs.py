"""Structured, quiet-by-default logging: one JSON object a line on stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str = "WARNING", as_json: bool = True) -> None:
    """Route patchserve's loggers to stderr at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("patchserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


# Libraries that log warnings a person cannot act on (vLLM at import: Triton, NUMA, platform notes).
_NOISY = ("vllm", "transformers", "torch", "huggingface_hub", "peft")


def quiet_libraries(level: str) -> None:
    """Other libraries' logs only at debug; set in the environment too, so vLLM's spawned processes inherit it.

    vLLM 0.32 configures its logging only when an engine is created, so what it logs while being
    imported (in this process and in each engine-core process it spawns) would reach Python's
    last-resort handler; the level is set on its logger before that, from the environment.
    """
    debug = level.lower() == "debug"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "DEBUG" if debug else "ERROR")
    if not debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # c10 warnings (NUMA binding) from the engine core
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # inherited by spawned processes
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        warnings.simplefilter("ignore")
    apply_library_levels()


def apply_library_levels() -> None:
    """Set the noisy libraries' loggers to the level the environment names (VLLM_LOGGING_LEVEL)."""
    level = os.environ.get("VLLM_LOGGING_LEVEL")
    if level:
        for name in _NOISY:
            logging.getLogger(name).setLevel(level.upper())


def quiet_engine_on_stop() -> None:
    """Once the process is stopping: the engine's complaints about being stopped are not news.

    A second Ctrl-C reaches vLLM's engine-core process (it is in the terminal's process group) while the
    gateway is still shutting it down in order, and vLLM then logs its own death as an error with a
    traceback. At debug level everything still shows.
    """
    if os.environ.get("VLLM_LOGGING_LEVEL", "").upper() != "DEBUG":
        logging.getLogger("vllm").setLevel(logging.CRITICAL)
