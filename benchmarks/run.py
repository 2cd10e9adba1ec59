"""Benchmark entry point: the same as ``mosaic-fast bench`` (see ``--help``)."""

import sys

from mosaic_fast.bench.run import main

if __name__ == "__main__":
    sys.exit(main())
