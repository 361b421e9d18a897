"""Benchmark LoRA-family adapters on GLUE and SQuAD: `python -m harness` runs; `harness.load_rows` reads the rows.

`load_rows` is imported on first use: `import harness`, which every `python -m harness` does, stays cheap.
"""

__all__ = ["load_rows"]


def __getattr__(name: str):
    if name == "load_rows":
        from harness.rows import load_rows

        return load_rows
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
