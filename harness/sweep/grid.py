"""The grid: which jobs (override lists) a sweep expands to.

`expand_jobs` builds the Cartesian product exactly as Hydra's basic sweeper does, with two additions a benchmark
grid needs:
* rank-free variants (registry class with `uses_rank = False`: full, head, bitfit) drop the rank params, so they
  run once per task x seed instead of once per rank;
* `when:` rules, `"key=value": [overrides]`, add overrides to the jobs with that choice (a paper's own recipe for
  one variant, a per-task step budget); what the user typed on the command line always wins.
Pure functions of the grid (plus the variant registry), so they are tested without Hydra's plugin machinery.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from harness.errors import ConfigError

VARIANT_KEY = "variant"


def uses_rank(variant: str) -> bool:
    """Whether `variant` has a rank to sweep, from its registry class (the single source of truth)."""
    from harness.adapters import VARIANTS  # imports torch: only when a sweep is expanded

    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r} in the sweep is not registered; registered variants: "
                          f"{', '.join(sorted(VARIANTS))} (each needs harness/adapters/<file>.py and "
                          "conf/variant/<name>.yaml)")
    return bool(VARIANTS[variant].uses_rank)


def override_key(override: str) -> str:
    """`+variant.r=4` -> `variant.r`: the config key an override string sets (prefixes +, ++, ~ dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def expand_jobs(grid: Sequence[Sequence[str]], default_variant: str, rank_params: Sequence[str],
                when: dict[str, Sequence[str]] | None = None,
                rank_used: Callable[[str], bool] = uses_rank,
                declared: Sequence[Sequence[str]] = (),
                command_line: Sequence[str] = ()) -> list[list[str]]:
    """The jobs (override lists) of a sweep, from the full Cartesian product `grid` of its params.

    For a rank-free variant the overrides of `rank_params` are dropped, so the product over ranks collapses
    to one job per remaining combination (kept at its first position, order otherwise unchanged). Then, for
    each `when` entry `"key=value": [overrides]` (in order) whose choice the job has, those overrides are
    added, replacing any earlier override of the same key: a paper's own recipe for one variant, or a
    per-task step budget. A key the user set on the `command_line` (overrides as typed) is never replaced:
    `+sweep=cpu_glue train.epochs=5` trains 5 epochs everywhere, whatever the file's `when` says.
    An entry is a typo, and an error, when no job chose its value and the sweep file's
    own grid (`declared`, its params before command-line narrowing) does not list it either, or when it names
    an unregistered variant; a file narrowed on the command line (`+sweep=cpu_glue task=mrpc`) keeps its
    entries for the tasks it no longer runs.
    """
    when = {condition: list(extra) for condition, extra in (when or {}).items()}
    for condition in when:
        key, sep, value = condition.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"hydra.sweeper.when key {condition!r} is not a choice; write it as key=value, "
                              "e.g. variant=full or task=rte")
        if key == VARIANT_KEY:
            rank_used(value)  # an unknown variant here is a typo: fail now, naming the registered ones
    rank_keys = set(rank_params)
    pinned = {override_key(o) for o in command_line}
    known = {override_key(o) + "=" + o.partition("=")[2] for point in declared for o in point}
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for point in grid:
        choices = {override_key(o): o.partition("=")[2] for o in point}
        choices.setdefault(VARIANT_KEY, default_variant)
        known.update(f"{key}={value}" for key, value in choices.items())
        job = [o for o in point if rank_used(choices[VARIANT_KEY]) or override_key(o) not in rank_keys]
        for condition, extra in when.items():
            key, _, value = condition.partition("=")
            if choices.get(key) == value:
                extra = [o for o in extra if override_key(o) not in pinned]
                extra_keys = {override_key(o) for o in extra}
                job = [o for o in job if override_key(o) not in extra_keys] + extra
        if tuple(job) not in seen:
            seen.add(tuple(job))
            jobs.append(job)
    unknown = [c for c in when if c not in known]
    if unknown:
        raise ConfigError(f"hydra.sweeper.when {unknown}: neither the sweep's params nor the command line choose "
                          f"that; each entry must be one of their choices: {', '.join(sorted(known))}")
    return jobs
