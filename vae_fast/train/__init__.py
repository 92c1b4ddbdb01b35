"""The trainer, the layer above the models: a run's settings (``config``), what they build (``build``: device,
model, optimizer, data), the run folder (``run_folder``: checkpoints, lock, atomic writes), the loop (``loop``:
DDP, AMP, resume, ``evaluate``), the data sets (``data``), the figures (``plots``), how messages name settings
(``messages``) and the command line (``cli``). ``from vae_fast.train import TrainConfig, train, load_run`` is
the Python API."""

import importlib

from .config import TrainConfig

# Loaded on first use: `import vae_fast` (which needs only vf.data) stays free of matplotlib and the loop.
_LAZY = {"TrainResult": "loop", "evaluate": "loop", "train": "loop", "RunInUse": "run_folder", "load_run": "run_folder"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["RunInUse", "TrainConfig", "TrainResult", "evaluate", "load_run", "train"]
