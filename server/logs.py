"""Where `effllm serve`'s log records go: a quiet console, everything in RUN_DIR/server.log.

Quiet (the default): the console shows effllm's own lines (listen address, model, engine, precision,
readiness, the run dir, drains) and this process's library errors; vLLM's, transformers' and every other
library's records go to the log file only. vLLM configures its own logging in each of its processes (the
engine core is a separate process) from VLLM_* variables, so this module points VLLM_LOGGING_CONFIG_PATH at
a dictConfig file that sends the `vllm` logger to the same file in the server and in every process it
starts. What else the libraries write to stderr themselves (torch's and torchao's own handlers, warnings
and tracebacks in the engine core, C++ messages) goes there too: file descriptor 2 is pointed at the log
file, which child processes inherit, and only the console handler keeps the terminal (a copy of the
original descriptor). Progress bars (tqdm, huggingface_hub) are switched off by their variables.
Verbose (`--log-level LEVEL` or `-v`/`-vv`): every record at that level on the console as well, vLLM
with its own format. Invariant: call `setup()` once, before vLLM or transformers are imported; variables
the user already set win over ours.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

LOG_FILE = "server.log"
VLLM_CONFIG_FILE = "vllm-logging.json"
_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d]: %(message)s"
_QUIET_ENV = {
    "TQDM_DISABLE": "1",  # vLLM's weight-loading bars in the engine core
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",  # in processes we cannot configure (the parent sets INFO again)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


class _Console(logging.Formatter):
    """`HH:MM:SS message`, with the level in front of warnings and errors and the logger for libraries."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if not record.name.startswith("effllm"):
            text = f"{record.name}: {text}"
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname} {text}"
        return f"{self.formatTime(record, '%H:%M:%S')} {text}"


class _QuietFilter(logging.Filter):
    """effllm's own records from INFO up; other libraries' only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == "effllm" or record.name.startswith("effllm.")
        return record.levelno >= (logging.INFO if own else logging.ERROR)


def console_level(log_level: str | None, verbose: int) -> int | None:
    """None: quiet; else the level every record is shown from."""
    if log_level:
        level = logging.getLevelName(log_level.upper())
        if not isinstance(level, int):
            raise ValueError(f"--log-level {log_level!r} is not a logging level (DEBUG, INFO, WARNING, ...)")
        return level
    if verbose:
        return logging.DEBUG if verbose > 1 else logging.INFO
    return None


def _vllm_config(log_file: Path) -> dict[str, object]:
    fmt = {"format": _FILE_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"file": fmt},
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": str(log_file),
                "mode": "a",
                "formatter": "file",
                "level": "DEBUG",
            },
        },
        "loggers": {"vllm": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }


def setup(run_dir: Path, log_level: str | None = None, verbose: int = 0) -> Path:
    """Configure this process (and, through the environment, the processes it starts). Returns the log
    file's path. Raises ValueError for an unknown --log-level."""
    level = console_level(log_level, verbose)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_dir / LOG_FILE
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    if level is None:
        console = logging.StreamHandler(_keep_terminal_send_stderr_to(log_file))
        console.addFilter(_QuietFilter())
        root.setLevel(logging.INFO)
        for key, value in _QUIET_ENV.items():
            os.environ.setdefault(key, value)
        if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:
            config = run_dir / VLLM_CONFIG_FILE
            config.write_text(json.dumps(_vllm_config(log_file), indent=1))
            os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(config)
            os.environ["VLLM_CONFIGURE_LOGGING"] = "1"
    else:
        console = logging.StreamHandler()
        console.setLevel(level)
        root.setLevel(min(level, logging.INFO))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", logging.getLevelName(level))
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    console.setFormatter(_Console())
    root.addHandler(file_handler)
    root.addHandler(console)
    logging.captureWarnings(True)  # warnings.warn from libraries: records (quiet: the file only)
    return log_file


def _keep_terminal_send_stderr_to(log_file: Path) -> TextIO:
    """Point fd 2 (inherited by every child process, written by C++ code and by handlers bound to
    sys.stderr) at `log_file`; return a text stream on a copy of the original stderr for our console."""
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    return terminal


def route_transformers() -> None:
    """transformers logs through its own stderr handler: send its records to ours instead (INFO and up,
    so the file has them). Call once transformers may be imported; a no-op without it."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:
        return
    tf_logging.disable_default_handler()
    tf_logging.enable_propagation()
    tf_logging.set_verbosity_info()
