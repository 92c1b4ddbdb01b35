"""How the trainer's messages name settings: as the command line's flags while a command runs (``--batch-size``,
``--resume``), else as the Python API's arguments (``batch_size``, ``resume=True``); and its status lines."""

from __future__ import annotations

import contextvars
import sys

# The command line's name ("vae-fast", "python -m vae_fast") while it runs a command, else None: messages
# then name settings as its flags (--batch-size, --resume), else as the Python API's arguments.
CLI_PROG: contextvars.ContextVar[str | None] = contextvars.ContextVar("vae_fast_cli_prog", default=None)


def flag(name: str) -> str:
    """A setting as the caller spells it: ``--batch-size`` on the command line, ``batch_size`` in Python."""
    return "--" + name.replace("_", "-") if CLI_PROG.get() else name


def setting(name: str, value=True) -> str:
    """A setting with its value as the caller spells it: ``--resume``, ``--objective iwae``; ``resume=True``,
    ``objective='iwae'``."""
    if CLI_PROG.get():
        return flag(name) if value is True else f"{flag(name)} {value}"
    return f"{name}={value!r}"


def say(message: str) -> None:
    """A status line for logs (stderr, flushed at once: job logs are files)."""
    print(f"{CLI_PROG.get() or 'vae_fast'}: {message}", file=sys.stderr, flush=True)
