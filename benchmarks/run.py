#!/usr/bin/env python
"""Run the vae_fast benchmark suite (same as ``python -m vae_fast bench``); flags: ``--help``.

    python benchmarks/run.py                # full run on the default device, results in benchmarks/results/
    python benchmarks/run.py --quick        # tiny sizes, under a minute; its files end in -quick
    python benchmarks/run.py --merge a.json b.json --out DIR   # join the parts of one device's run
"""

import sys

from vae_fast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
