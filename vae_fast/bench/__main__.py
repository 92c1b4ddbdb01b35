"""``python -m vae_fast.bench [flags]``: the same as ``python -m vae_fast bench [flags]``."""

import sys

from .cli import main

sys.exit(main())
