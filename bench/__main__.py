"""``python -m bench`` runs the relay benchmark (``bench/relay_bench.py``)."""

import sys

from bench.relay_bench import main

# Spawned load generators re-import this module as "__mp_main__": only the real
# command may run the benchmark.
if __name__ == "__main__":
    sys.exit(main())
