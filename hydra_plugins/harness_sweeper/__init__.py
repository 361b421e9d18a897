"""The `harness` Hydra sweeper: a grid like the basic sweeper's that knows rank-free variants (logic in harness/sweep/)."""
