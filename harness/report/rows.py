"""The rows a report is made of: loading them, choosing some, the ok ones, the failures, and each run's
saved predictions and history."""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from harness import rows as row_store
from harness import run_keys
from harness.errors import ReportError
from harness.metrics import constant_predictions
from harness.report.labels import VARIANT_ORDER

log = logging.getLogger(__name__)


# ---- loading -----------------------------------------------------------------------------------------
def load(*dirs: str | Path) -> pd.DataFrame:
    """Every row under `dirs` (all statuses), with the columns the report adds.

    Added: `group` (model|variant|rank|impl, the table's row key), `holdout` (the row's protocol is not the
    standard split), `kind` (task kind from the row's config: glue, squad, ...) and `artifacts` (the folder
    with the run's history and predictions). `ok_rows` adds `start` and splits cold runs off (`split_cold_starts`).
    """
    if not dirs:
        raise ReportError("give at least one results folder, e.g. `python -m harness.report results/cpu_glue`")
    for folder in map(Path, dirs):
        if not folder.is_dir():
            raise ReportError(f"results folder {str(folder)!r} does not exist; pass the folder a sweep wrote "
                              "(results/<sweep_name>) or one holding several sweeps (results)")
    rows = row_store.load_rows(*dirs)  # the rows the notebook and harness.load_rows give
    if rows.empty:
        raise ReportError(
            f"no results rows under {', '.join(map(str, dirs))}: expected <dir>/runs/<run_key>.parquet or "
            "<dir>/<sweep>/runs/<run_key>.parquet. Run something first, e.g. "
            "`python -m harness +sweep=smoke` (rows go to results/<sweep_name>/runs/)")
    rows = rows.copy()
    no_score = (rows.status == "ok") & ~np.isfinite(rows.score_best.astype(float))
    if no_score.any():  # written before the row writer refused them: a NaN score, stored as null
        log.warning("%d ok rows have no finite score (written by older code); listed as failed", int(no_score.sum()))
        rows.loc[no_score, "error"] = "NoScore: an ok row without a finite score (older code); run it again"
        rows.loc[no_score, "status"] = "failed"
    rows["rank"] = rows["rank"].astype("Int64")
    rows["impl"] = rows["impl"].fillna("ours")
    rows["holdout"] = rows["protocol"].fillna("").str.startswith("holdout")
    rows["kind"] = [json.loads(c).get("task", {}).get("kind") if isinstance(c, str) else None
                    for c in rows["config_json"]]
    rows["group"] = [group_key(m, v, r, i) for m, v, r, i in zip(rows.model, rows.variant, rows["rank"], rows.impl)]
    order = sorted(range(len(rows)), key=lambda i: (group_sort_key(rows.iloc[i]), str(rows.task.iloc[i]),
                                                    int(rows.seed.iloc[i]) if pd.notna(rows.seed.iloc[i]) else -1,
                                                    rows.run_key.iloc[i]))
    return rows.iloc[order].reset_index(drop=True)


def group_key(model, variant, rank, impl) -> str:
    return f"{model}|{variant}|{'' if pd.isna(rank) else int(rank)}|{impl}"


NO_WARM_START = "no warm start"
COLD_SUFFIX = f"|{NO_WARM_START}"  # ends the group key of a method's runs split off by split_cold_starts


def method_group(groups: pd.Series) -> pd.Series:
    """The method's own group key of each group, "(no warm start)" rows folded back."""
    return groups.str.removesuffix(COLD_SUFFIX)


def warm_started(rows: pd.DataFrame) -> pd.Series:
    """Whether each run started from another run's adapter (init_from: MNLI's, for MRPC/RTE/STS-B)."""
    return rows["init_from"].fillna("").astype(str).str.len().gt(0) if "init_from" in rows else \
        pd.Series(False, index=rows.index)


def split_cold_starts(ok: pd.DataFrame) -> pd.DataFrame:
    """Where a method has both warm-started and cold runs of one task among the `ok` rows (a sweep with
    init_from beside one without, as cpu_glue_v2 and cpu_glue_v2_rte_cold), the cold runs become a row of their
    own, `start` = NO_WARM_START, instead of being mixed into one cell as if they were seeds. Decided on the rows
    given, so a selection that drops the warm runs leaves the cold ones in the method's own row."""
    ok = ok.assign(group=method_group(ok.group))
    warm = warm_started(ok)
    keys = [ok.group, ok.task.fillna("")]
    cold = ~warm & warm.groupby(keys).transform("any") & (~warm).groupby(keys).transform("any")
    ok["start"] = np.where(cold, NO_WARM_START, "")
    ok.loc[cold, "group"] = ok.loc[cold, "group"] + COLD_SUFFIX
    return ok


def group_sort_key(row) -> tuple:
    """Model, then the baselines in the paper's order, then the other variants by name, rank and impl (a
    method's runs without warm start right after it)."""
    variant = row["variant"]
    position = VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER)
    rank = -1 if pd.isna(row["rank"]) else int(row["rank"])
    return (str(row["model"]), position, str(variant), rank, row["impl"] != "ours", str(row["impl"]),
            str(row.get("start", "")))


def select(rows: pd.DataFrame, tasks: Iterable[str] | None = None, variants: Iterable[str] | None = None,
           ranks: Iterable[int] | None = None, models: Iterable[str] | None = None) -> pd.DataFrame:
    """The rows of the chosen tasks, variants, ranks and models (None keeps all).

    A rank filter keeps rank-free variants (full, head, bitfit): they are the baselines every rank is
    compared with; drop them with `variants`.
    """
    keep = pd.Series(True, index=rows.index)
    for column, wanted in (("task", tasks), ("variant", variants), ("model", models)):
        if wanted is not None:
            wanted = set(wanted)
            unknown = wanted - set(rows[column].dropna())
            if unknown:
                raise ReportError(f"{column} {sorted(unknown)} not in these rows; they have "
                                  f"{sorted(set(rows[column].dropna()))}")
            keep &= rows[column].isin(wanted)
    if ranks is not None:
        keep &= rows["rank"].isna() | rows["rank"].isin(list(ranks))
    return rows[keep].reset_index(drop=True)


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The `ok` rows, cold runs beside warm ones split off (`split_cold_starts`), after checking that no table
    cell would mix two configurations as if they were seeds."""
    ok = split_cold_starts(rows[rows.status == "ok"].reset_index(drop=True))
    duplicated = ok[ok.duplicated(["group", "task", "seed"], keep=False)]
    if not duplicated.empty:
        first = duplicated.groupby(["group", "task", "seed"], sort=True).head(2).head(2)
        differs = config_differences(first.config_json.tolist())
        raise ReportError(
            f"{len(duplicated)} ok rows share variant, rank, impl, task and seed but differ in "
            f"{', '.join(differs) or 'their run_key only'} (e.g. runs {', '.join(first.run_key)}): a table cell "
            f"would mix two configurations as if they were seeds. {REPORT_SEPARATELY}")
    for (_, task), cell in ok.groupby(["group", "task"], sort=False):
        if len(cell) < 2:
            continue
        rank = cell["rank"].iloc[0]
        method = cell.variant.iloc[0] + ("" if pd.isna(rank) else f" r={int(rank)}")
        differs = [k for k in config_differences(cell.config_json.tolist()) if k not in SEED_KEYS]
        # precision: auto is bf16 here, fp32 there; a model fingerprint is unrecorded in rows from before it
        for column, what, unrecorded_counts in (("precision", "precision as computed", True),
                                                ("data_fingerprint", "data files", True),
                                                ("model_fingerprint", "model files", False)):
            values = cell[column] if column in cell else pd.Series(dtype=object)
            values = values if unrecorded_counts else values.dropna()
            if values.nunique(dropna=False) > 1:
                differs.append(f"{what} ({', '.join(sorted(map(str, values.unique())))})")
        if "extra_json" in cell and (fact_keys := fact_differences(cell.extra_json)):  # QLoRA's `auto` settings
            differs.append(f"what was assembled ({', '.join(fact_keys)})")
        if source_keys := source_differences(cell, rows):
            differs.append(f"their warm-start sources' {', '.join(source_keys)}")
        if differs:
            raise ReportError(
                f"the ok rows of {method} on {task} (seeds {', '.join(map(str, sorted(cell.seed)))}) differ in "
                f"{', '.join(differs)} (runs {', '.join(cell.run_key)}): their cell would mix configurations as if "
                f"they were seeds (the sweep file changed between sittings, say). {REPORT_SEPARATELY}")
    return ok


def fact_differences(extra_json: pd.Series) -> list[str]:
    """Keys of the variant's facts (a row's extra_json) whose values differ between rows: QLoRA's `backend=auto`
    and `compute_dtype=auto` are settled per machine (torchao or bitsandbytes, bf16 or fp32) and only these
    facts record what they became; the run_key holds `auto`. A fact that older code did not record is named as
    such: those rows cannot show that they computed alike."""
    facts = [json.loads(x) if isinstance(x, str) else {} for x in extra_json]
    return [k if all(k in f for f in facts) else f"{k}, unrecorded in some rows" for k in differing_keys(facts)]


def source_differences(cell: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    """Config keys in which the warm-start sources of one cell's seeds differ, their own seed keys aside (seed 0
    started from MNLI's LoRA, seed 1 from QNLI's: init_from holds only the source's run_key, so the cell's own
    configs agree). Sources that are not among `rows` (another results folder) cannot be compared."""
    if "init_from" not in cell:
        return []
    configs = rows.drop_duplicates("run_key").set_index("run_key").config_json
    sources = [configs[key] for key in cell.init_from.dropna().unique() if key in configs.index]
    return [key for key in config_differences(sources) if key not in SEED_KEYS] if len(sources) > 1 else []


REPORT_SEPARATELY = ("Report them separately (one results folder each), or filter the rows first (report.select, "
                     "or pandas on report.load(...)).")
# What differs between the seeds of one cell by design: the seed, what is drawn from it (VeRA's shared matrices),
# and a warm start's source (its run_key: the sources' own configs must agree, `source_differences`).
SEED_KEYS = {"seed", "variant.seed", "init_from"}


@functools.cache
def flat_config(config_json: str) -> Mapping[str, Any]:
    """A row's config_json as dotted keys, paths and devices left out (cached, so read-only: every table checks
    its cells)."""
    return MappingProxyType(flatten(run_keys.semantic_config(OmegaConf.create(json.loads(config_json)))))


def config_differences(configs: Sequence[str]) -> list[str]:
    """Dotted keys whose values differ between the given config_json strings (paths and devices ignored)."""
    return differing_keys([flat_config(c) for c in configs])


def differing_keys(mappings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every mapping (a key some lack counts as None there)."""
    keys = sorted(set().union(*mappings))
    return [k for k in keys if len({json.dumps(m.get(k), sort_keys=True, default=str) for m in mappings}) > 1]


def flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows that are not `ok`, one line each, with the first line of the error."""
    failed = rows[rows.status != "ok"]
    return pd.DataFrame({
        "run_key": failed.run_key, "status": failed.status, "task": failed.task, "variant": failed.variant,
        "rank": failed["rank"], "impl": failed.impl, "seed": failed.seed,
        "error": [first_line(e) for e in failed.error],
    }).reset_index(drop=True)


def first_line(text, limit: int = 200) -> str:
    line = str(text).strip().splitlines()[0] if isinstance(text, str) and text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def read_predictions(artifacts: str | Path, checkpoint: str = "best", split: str | None = None) -> pd.DataFrame | None:
    """A run's saved validation predictions at `checkpoint`, of one `split` (None: all); None if not saved."""
    path = Path(artifacts) / "predictions.parquet"
    if not path.exists():
        return None
    frame = pd.read_parquet(path)
    if "checkpoint" in frame:
        frame = frame[frame.checkpoint == checkpoint]
    if split is not None and "split" in frame:
        frame = frame[frame.split == split]
    return frame.drop(columns=["checkpoint"], errors="ignore").reset_index(drop=True)



# ---- which evaluation a table reports (--selection) and degenerate runs --------------------------------
# The predictions' checkpoint name and the row's score column of each `--selection`.
SELECTIONS = {"eval_best": ("best", "score_best"), "last": ("last", "score_last"), "heldout": ("selected", "score_selected")}


def apply_selection(rows: pd.DataFrame, selection: str = "eval_best") -> pd.DataFrame:
    """`rows` with metric_* (and score_best, which the plots read) taken at the evaluation `selection` names, and
    the columns `checkpoint` (the predictions to test and to check for constancy) and `degenerate`.

    eval_best keeps the rows as written; last reads each row's last_metrics_json; heldout keeps the rows trained
    with train.selection=heldout and reads their history at the selected step. `degenerate` is recomputed from
    the saved predictions at that checkpoint, so rows written before the column existed get it too."""
    if selection not in SELECTIONS:
        raise ReportError(f"--selection {selection!r}: use one of {', '.join(SELECTIONS)}")
    checkpoint, score = SELECTIONS[selection]
    rows = rows.copy()
    for column in ("selection", "score_selected", "selected_step", "degenerate", "last_metrics_json"):
        if column not in rows:
            rows[column] = None
    ok = rows.status == "ok"
    if selection == "heldout":
        rows = rows[~ok | (rows.selection == "heldout")].copy()
        ok = rows.status == "ok"
    metric_columns = [c for c in rows if c.startswith("metric_")]
    for i in rows.index[ok] if selection != "eval_best" else []:  # eval_best: the rows as written
        values = selected_evaluation(rows.loc[i], selection)
        for column in metric_columns:
            rows.at[i, column] = values.get(column.removeprefix("metric_"))
        rows.at[i, "score_best"] = rows.at[i, score]  # the plots and the rank curve read score_best
        rows.at[i, "best_step"] = values["step"]
    rows["checkpoint"] = checkpoint
    # A row's own `degenerate` describes its train.selection's checkpoint (older rows: eval_best's).
    rows["degenerate"] = [degenerate_at(a, checkpoint, d if (sel if isinstance(sel, str) else "eval_best") == selection
                                        else None) if status == "ok" else None
                          for a, status, d, sel in zip(rows.artifacts, rows.status, rows.degenerate, rows.selection)]
    return rows


def selected_evaluation(row: pd.Series, selection: str) -> dict:
    """The metrics (and step) of the evaluation `selection` (last or heldout) names for an ok row: the row's
    last_metrics_json, else its history (the model as trained). A ReportError when neither holds it: the row's
    own metric columns are eval_best's, and a table must not show them under another selection's name."""
    history_path = Path(row["artifacts"]) / "history.parquet"
    if selection == "last" and isinstance(row["last_metrics_json"], str):
        return json.loads(row["last_metrics_json"])
    if history_path.exists():
        history = pd.read_parquet(history_path)
        history = history[history["setting"].isna()] if "setting" in history else history
        step = row["selected_step"] if selection == "heldout" else history.step.max()
        hit = history[history.step == step]
        if len(hit):
            return hit.iloc[0].to_dict()
    raise ReportError(
        f"run {row['run_key']} ({row['variant']}, {row['task']}, seed {row['seed']}): --selection {selection} needs "
        f"its {'selected' if selection == 'heldout' else 'last'} evaluation, and {history_path} does not hold it. "
        "Restore the run's folder (git checkout, or a copy of results/), or run it again with rerun=true.")


def degenerate_at(artifacts: str | Path, checkpoint: str, recorded=None) -> bool | None:
    """Whether the run's predictions at `checkpoint` are constant (harness.metrics.constant_predictions); the
    row's own `degenerate` when the predictions were not saved."""
    frame = read_predictions(artifacts, checkpoint)
    if frame is None or frame.empty:
        return None if recorded is None or pd.isna(recorded) else bool(recorded)
    return constant_predictions(frame)


# ---- histories and DyLoRA's rank scores --------------------------------------------------------------
def histories(rows: pd.DataFrame) -> pd.DataFrame:
    """Every ok run's evaluation history (the model as trained; DyLoRA's per-rank settings left out)."""
    frames = []
    for row in ok_rows(rows).itertuples():
        path = Path(row.artifacts) / "history.parquet"
        if not path.exists():
            continue
        history = pd.read_parquet(path)
        if "setting" in history:
            history = history[history.setting.isna()]
        frames.append(history[["step", "epoch", "train_loss", "score"]].assign(
            group=row.group, task=row.task, seed=row.seed, run_key=row.run_key))
    columns = ["step", "epoch", "train_loss", "score", "group", "task", "seed", "run_key"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def rank_scores(rows: pd.DataFrame) -> pd.DataFrame:
    """DyLoRA's score per evaluated rank as long rows, at the evaluation the table scores (best_step, which
    apply_selection moves to the selection's), from its history; a run without history gives its row's
    rank_scores_json (those of its last evaluation)."""
    ok = ok_rows(rows)
    ok = ok[ok.rank_scores_json.notna()]
    out = []
    for row in ok.itertuples():
        settings = json.loads(row.rank_scores_json)
        path = Path(row.artifacts) / "history.parquet"
        if path.exists():
            history = pd.read_parquet(path)
            if "setting" in history:
                at_best = history[history.setting.notna() & (history.step == row.best_step)]
                settings = dict(zip(at_best.setting, at_best.score)) or settings
        for label, score in settings.items():
            digits = re.findall(r"\d+", str(label))
            out.append({"group": row.group, "task": row.task, "seed": row.seed, "setting": str(label),
                        "rank": int(digits[-1]) if digits else np.nan, "score": score})
    return pd.DataFrame(out, columns=["group", "task", "seed", "setting", "rank", "score"])
