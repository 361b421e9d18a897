"""The `harness` Hydra sweeper: a grid like the basic sweeper's that knows rank-free variants (see harness/sweep.py)."""
