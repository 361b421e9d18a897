"""SQuAD v1.1 and v2.0: extractive question answering, preprocessed and scored as the field does it.

Preprocessing follows Hugging Face's run_qa.py (the reference most published numbers come from):

* the question (left-stripped) and the context are tokenized as a pair and only the context is truncated;
  a long context becomes several overlapping windows (`max_seq_len` tokens, consecutive windows share
  `doc_stride` tokens), each a training/evaluation feature that keeps its offset mapping into the context;
* a feature's label is the answer's first/last token, or the CLS token when the window does not contain
  the whole answer or the question has none (SQuAD v2). Only the first gold answer is a training label.
* A question longer than `max_question_len` tokens is cut to its first `max_question_len` tokens (Google's
  BERT run_squad.py does the same with max_query_length=64). run_qa.py does not, and the tokenizer then
  aborts the whole batch when a question leaves no room for context; cutting keeps a run alive for the
  rare pathological question and is counted: every feature says whether its question was cut, and the
  number of cut questions is logged per split.

Post-processing (run_qa.py's utils_qa.postprocess_qa_predictions): in every window the `n_best` highest
start and end logits are paired, pairs outside the context, reversed or longer than `max_answer_length`
tokens are dropped, the rest are scored start+end and mapped back to the context text through the
offsets; the best pair over all windows of a question is its answer. For v2 the null score (CLS start +
CLS end, the lowest over the windows) competes with the best span: the question is answered "" when
null - best span > `null_score_threshold`. That difference is fed to the official v2 scorer as the
no-answer "probability", which also reports the best threshold on the evaluation set (best_f1_thresh).

Scores are the official scripts' (harness.metrics), in 0..100 like published SQuAD numbers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import datasets
import numpy as np
import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence

from harness.errors import ConfigError, require
from harness.metrics import (
    apply_no_ans_threshold,
    exact_match_score,
    f1_score,
    get_raw_scores,
    make_qid_to_has_ans,
    metric_max_over_ground_truths,
    squad_v1_scores,
    squad_v2_scores,
)
from harness.tasks import register_kind
from harness.tasks.base import Task

log = logging.getLogger(__name__)

LABEL_COLUMNS = ("start_positions", "end_positions")
NOT_CONTEXT = -1  # offset of a token outside the context (question, special tokens)


# ---- preprocessing ---------------------------------------------------------------------------------------
def fit_questions(tokenizer, questions: list[str], max_tokens: int) -> tuple[list[str], list[bool]]:
    """Questions cut to at most `max_tokens` tokens (cut in the text, at the end of the last kept token).

    Re-tokenizing a cut text can merge differently, so cut texts are checked again until all fit.
    Returns the texts and, per question, whether it was cut.
    """
    texts, cut = list(questions), [False] * len(questions)
    todo = list(range(len(texts)))
    while todo:
        offsets = tokenizer([texts[i] for i in todo], add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        still = []
        for i, spans in zip(todo, offsets):
            if len(spans) > max_tokens:
                texts[i], cut[i] = texts[i][:spans[max_tokens - 1][1]], True
                still.append(i)
        todo = still
    return texts, cut


def answer_token_span(offset_start: list[int], offset_end: list[int], start_char: int, end_char: int
                      ) -> tuple[int, int] | None:
    """First and last token of the answer [start_char, end_char) in one window, or None if not all inside.

    The start token is the last context token starting at or before `start_char`, the end token the first
    one ending at or after `end_char` (run_qa.py's rule; offsets of context tokens increase).
    """
    context = [i for i, s in enumerate(offset_start) if s != NOT_CONTEXT]
    if not context or offset_start[context[0]] > start_char or offset_end[context[-1]] < end_char:
        return None
    start = max(i for i in context if offset_start[i] <= start_char)
    end = min(i for i in context if offset_end[i] >= end_char)
    return start, end


# ---- post-processing -------------------------------------------------------------------------------------
def best_span(start_logits: np.ndarray, end_logits: np.ndarray, offset_start: np.ndarray, offset_end: np.ndarray,
              n_best: int, max_answer_length: int) -> tuple[float, int, int] | None:
    """(start + end logit, start char, end char) of the best answer span in one window, or None.

    Candidates are the `n_best` highest start and end logits over the whole window (as run_qa.py); pairs
    whose tokens are outside the context, reversed, or longer than `max_answer_length` tokens are dropped.
    Ties keep the first pair in (start rank, end rank) order, like run_qa.py's stable sort.
    """
    n = len(offset_start)
    start_logits, end_logits = start_logits[:n], end_logits[:n]
    starts = np.argsort(-start_logits, kind="stable")[:n_best]
    ends = np.argsort(-end_logits, kind="stable")[:n_best]
    s, e = np.meshgrid(starts, ends, indexing="ij")
    valid = ((offset_start[s] != NOT_CONTEXT) & (offset_start[e] != NOT_CONTEXT)
             & (e >= s) & (e - s + 1 <= max_answer_length))
    if not valid.any():
        return None
    scores = np.where(valid, start_logits[s] + end_logits[e], -np.inf)
    best = np.unravel_index(np.argmax(scores), scores.shape)
    return float(scores[best]), int(offset_start[s[best]]), int(offset_end[e[best]])


@dataclass
class Answer:
    """The post-processed answer to one question."""

    text: str            # best non-null span ("" if no window had a valid span)
    span_score: float    # its start + end logit (-inf if none)
    null_score: float    # lowest CLS start + CLS end logit over the question's windows

    @property
    def null_score_diff(self) -> float:
        """null - best span: the v2 no-answer 'probability' (answer "" when above the threshold)."""
        return self.null_score - self.span_score


def postprocess(example_ids: list[str], contexts: dict[str, str], offset_start: list[np.ndarray],
                offset_end: list[np.ndarray], cls_index: np.ndarray, start_logits: np.ndarray,
                end_logits: np.ndarray, n_best: int, max_answer_length: int) -> dict[str, Answer]:
    """{question id: Answer} from per-feature logits (row f of the logits belongs to feature f)."""
    best: dict[str, Answer] = {}
    for f, qid in enumerate(example_ids):
        null = float(start_logits[f, cls_index[f]] + end_logits[f, cls_index[f]])
        span = best_span(start_logits[f], end_logits[f], np.asarray(offset_start[f]), np.asarray(offset_end[f]),
                         n_best, max_answer_length)
        answer = best.setdefault(qid, Answer("", -np.inf, np.inf))
        answer.null_score = min(answer.null_score, null)
        if span is not None and span[0] > answer.span_score:
            answer.span_score, answer.text = span[0], contexts[qid][span[1]:span[2]]
    return best


# ---- the task --------------------------------------------------------------------------------------------
@register_kind("squad")
class SquadTask(Task):
    """SQuAD v1.1 (`version_2_with_negative: false`) or v2.0 (`true`) from conf/task/squad*.yaml.

    `data.max_train_samples` / `data.max_eval_samples` count questions (not windows) and are drawn before
    tokenization, so a question is never split between kept and dropped windows.
    """

    def __init__(self, cfg, data_cfg):
        super().__init__(cfg, data_cfg)
        self.examples: dict[str, datasets.Dataset] = {}  # raw evaluation questions by split, for scoring

    def validate(self) -> None:
        super().validate()
        c = self.cfg
        for key in ("doc_stride", "max_question_len", "n_best", "max_answer_length"):
            value = c.get(key)
            require(isinstance(value, int) and value >= (0 if key == "doc_stride" else 1), f"task.{key}", value,
                    "a non-negative integer" if key == "doc_stride" else "a positive integer")
        require(isinstance(c.get("version_2_with_negative"), bool), "task.version_2_with_negative",
                c.get("version_2_with_negative"), "true (SQuAD v2: unanswerable questions) or false")
        require(isinstance(c.get("null_score_threshold"), (int, float)), "task.null_score_threshold",
                c.get("null_score_threshold"), "a number (answer '' when null - best span score exceeds it)")
        allowed = ["exact", "f1"] + (["best_exact", "best_f1"] if self.with_null else [])
        require(self.primary_metric in allowed, "task.primary_metric", self.primary_metric, f"one of {allowed}")

    @property
    def head_kind(self) -> str:
        return "qa"

    @property
    def with_null(self) -> bool:
        return bool(self.cfg.version_2_with_negative)

    # ---- tokenization ---------------------------------------------------------------------------------
    def check_room(self, tokenizer) -> None:
        """A window must leave more than `doc_stride` context tokens after the longest allowed question."""
        c = self.cfg
        room = int(c.max_seq_len) - int(c.max_question_len) - tokenizer.num_special_tokens_to_add(pair=True)
        if room <= int(c.doc_stride):
            raise ConfigError(
                f"task.max_seq_len={c.max_seq_len} leaves {room} context tokens per window after a question of "
                f"task.max_question_len={c.max_question_len} tokens and the special tokens, but task.doc_stride="
                f"{c.doc_stride} needs more than that: raise max_seq_len or lower max_question_len or doc_stride")

    def cache_key(self, tokenizer, split_name: str, raw: datasets.Dataset) -> str:
        """The shared key plus the padding side, which decides whether the question or the context comes first."""
        return f"{super().cache_key(tokenizer, split_name, raw)}-{tokenizer.padding_side}"

    def encode(self, tokenizer, raw: datasets.Dataset) -> datasets.Dataset:
        """One row per window: model inputs, start/end labels, and what post-processing needs."""
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"task {self.name} needs a fast (Rust) tokenizer for offset mappings; "
                              f"got {type(tokenizer).__name__}")
        self.check_room(tokenizer)
        c = self.cfg
        # run_qa.py's convention: a tokenizer that pads on the left (XLNet) takes the context first.
        question_first = tokenizer.padding_side == "right"
        context_seq = 1 if question_first else 0
        input_names = list(tokenizer.model_input_names)

        def tokenize(batch):
            questions, cut = fit_questions(tokenizer, [q.lstrip() for q in batch["question"]],
                                           int(c.max_question_len))
            pair = (questions, batch["context"]) if question_first else (batch["context"], questions)
            enc = tokenizer(*pair, truncation="only_second" if question_first else "only_first",
                            max_length=int(c.max_seq_len), stride=int(c.doc_stride),
                            return_overflowing_tokens=True, return_offsets_mapping=True)
            out = {name: enc[name] for name in input_names if name in enc}
            out.update({k: [] for k in ("example_id", "offset_start", "offset_end", "cls_index",
                                        "question_truncated", *LABEL_COLUMNS)})
            for f, example in enumerate(enc["overflow_to_sample_mapping"]):
                sequence = enc.sequence_ids(f)
                spans = enc["offset_mapping"][f]
                starts = [s if seq == context_seq else NOT_CONTEXT for (s, _), seq in zip(spans, sequence)]
                ends = [e if seq == context_seq else NOT_CONTEXT for (_, e), seq in zip(spans, sequence)]
                cls = enc["input_ids"][f].index(tokenizer.cls_token_id)
                answers = batch["answers"][example]
                label = None
                if answers["text"]:
                    start_char = answers["answer_start"][0]
                    label = answer_token_span(starts, ends, start_char, start_char + len(answers["text"][0]))
                start, end = label or (cls, cls)
                for key, value in (("example_id", batch["id"][example]), ("offset_start", starts),
                                   ("offset_end", ends), ("cls_index", cls), ("question_truncated", cut[example]),
                                   ("start_positions", start), ("end_positions", end)):
                    out[key].append(value)
            return out

        encoded = raw.map(tokenize, batched=True, remove_columns=raw.column_names, desc=f"tokenize {self.name}")
        return encoded.add_column("feature_index", list(range(len(encoded))))

    def datasets(self, tokenizer, seed: int):
        train_raw, evals_raw = self.train_and_eval_raw()
        raws = {"train": self.limit(train_raw, "max_train_samples")}
        raws.update({name: self.limit(raw, "max_eval_samples") for name, raw in evals_raw.items()})
        features = {}
        for name, raw in raws.items():
            self.check_answerable(name, raw)
            features[name] = self.cached(tokenizer, name, raw, lambda r: self.encode(tokenizer, r))
            self.log_windows(name, raw, features[name])
        self.examples = {name: raws[name] for name in evals_raw}
        return features.pop("train"), features

    def check_answerable(self, split: str, raw: datasets.Dataset) -> None:
        """SQuAD v1.1 scoring needs a gold answer for every question: fail before tokenizing, not after training."""
        if self.with_null:
            return
        empty = [qid for qid, a in zip(raw["id"], raw["answers"]) if not a["text"]]
        if empty:
            raise ConfigError(f"task {self.name} (SQuAD v1.1 scoring) got {len(empty)} unanswerable questions in "
                              f"split {split!r}, e.g. {empty[:3]}; use task=squad_v2 (or set "
                              "task.version_2_with_negative=true) for data with unanswerable questions")

    def log_windows(self, split: str, raw: datasets.Dataset, features: datasets.Dataset) -> None:
        """Log questions -> windows, and how many questions were cut to max_question_len."""
        cut_flags = np.asarray(features["question_truncated"], dtype=bool)
        cut = len(set(np.asarray(features["example_id"])[cut_flags])) if cut_flags.any() else 0
        log.info("%s %s: %d questions -> %d windows (max_seq_len %s, doc_stride %s); %d questions longer than "
                 "task.max_question_len=%s tokens were cut", self.name, split, len(raw), len(features),
                 self.cfg.max_seq_len, self.cfg.doc_stride, cut, self.cfg.max_question_len)

    # ---- batches --------------------------------------------------------------------------------------
    def collate(self, tokenizer):
        """Pad on the right whatever the tokenizer's side: label positions index the unpadded window."""
        pad_values = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
        input_names = list(tokenizer.model_input_names)

        def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
            batch = {name: pad_sequence([torch.tensor(r[name]) for r in rows], batch_first=True,
                                        padding_value=pad_values.get(name, 0))
                     for name in input_names if name in rows[0]}
            for key in (*LABEL_COLUMNS, "feature_index"):
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
            return batch

        return collate

    def model_inputs(self, batch, training: bool):
        drop = {"feature_index"} | (set() if training else set(LABEL_COLUMNS))
        return {k: v for k, v in batch.items() if k not in drop}

    def batch_outputs(self, batch, outputs):
        """Start/end logits padded to max_seq_len (-inf) so batches of different lengths stack."""
        width = int(self.cfg.max_seq_len)

        def padded(logits: torch.Tensor) -> np.ndarray:
            out = np.full((logits.shape[0], width), -np.inf, dtype=np.float32)
            out[:, :logits.shape[1]] = logits.float().cpu().numpy()
            return out

        return {"feature_index": batch["feature_index"].cpu().numpy(),
                "start_logits": padded(outputs.start_logits), "end_logits": padded(outputs.end_logits)}

    # ---- scoring --------------------------------------------------------------------------------------
    def score(self, split, dataset, outputs):
        """Official metrics and one prediction row per question (with its exact/f1, 0..1, for bootstraps)."""
        if split not in self.examples:
            raise KeyError(f"task {self.name}: no examples kept for split {split!r}; call datasets() first")
        examples = self.examples[split]
        order = np.argsort(outputs["feature_index"])
        if not np.array_equal(outputs["feature_index"][order], np.arange(len(dataset))):
            raise ValueError(f"task {self.name}: outputs hold {len(order)} features but split {split!r} has "
                             f"{len(dataset)}; score() needs the outputs of every feature of the split")
        columns = ["example_id", "offset_start", "offset_end", "cls_index"]
        features = dataset.select_columns(columns).with_format("numpy")[:]
        ids, contexts = examples["id"], dict(zip(examples["id"], examples["context"]))
        answers = postprocess(list(features["example_id"]), contexts, features["offset_start"],
                              features["offset_end"], features["cls_index"], outputs["start_logits"][order],
                              outputs["end_logits"][order], int(self.cfg.n_best), int(self.cfg.max_answer_length))
        references = {qid: list(a["text"]) for qid, a in zip(ids, examples["answers"])}
        texts = {qid: answers[qid].text for qid in ids}
        frame = pd.DataFrame({"split": split, "idx": np.arange(len(ids)), "id": ids,
                              "answers": [json.dumps(references[q]) for q in ids]})
        frame["label"] = frame["answers"]  # the same gold answers, under the name every task uses
        if self.with_null:
            # The official v2 script's own protocol: the best span as the prediction and null - span as the
            # no-answer probability; a diff above the threshold then scores as an abstention (= predicting ""),
            # and find_best_thresh can search every threshold because the spans are kept.
            diffs = {qid: answers[qid].null_score_diff for qid in ids}
            threshold = float(self.cfg.null_score_threshold)
            metrics = squad_v2_scores(texts, references, no_answer_probs=diffs, no_answer_threshold=threshold)
            has_answer = make_qid_to_has_ans(references)
            exact, f1 = (apply_no_ans_threshold(raw, diffs, has_answer, threshold)
                         for raw in get_raw_scores(texts, references))
            frame["prediction"] = ["" if diffs[q] > threshold else texts[q] for q in ids]
            frame["best_non_null"] = [texts[q] for q in ids]
            frame["null_score_diff"] = [diffs[q] for q in ids]
            frame["has_answer"] = [has_answer[q] for q in ids]
        else:
            metrics = squad_v1_scores(texts, references)
            exact = {q: float(metric_max_over_ground_truths(exact_match_score, texts[q], references[q])) for q in ids}
            f1 = {q: float(metric_max_over_ground_truths(f1_score, texts[q], references[q])) for q in ids}
            frame["prediction"] = [texts[q] for q in ids]
        frame["exact"] = [float(exact[q]) for q in ids]
        frame["f1"] = [float(f1[q]) for q in ids]
        suffix = self.metric_suffix(split)
        metrics = {f"{k}{suffix}": float(v) for k, v in metrics.items() if not k.endswith("total")}
        return metrics, frame

