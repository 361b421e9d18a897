"""Loading models and tokenizers (harness/models.py)."""

from __future__ import annotations

import pytest

from harness import models
from harness.errors import HubUnavailable


def test_random_init_without_the_hub_names_the_offline_tokenizer(make_cfg, tmp_path):
    cfg = make_cfg("model=roberta_base", "model.init=random")
    with pytest.raises(HubUnavailable, match="model.tokenizer=tiny_bpe"):
        models.load_tokenizer(cfg.model, tmp_path)
    offline = make_cfg("model=roberta_base", "model.init=random", "model.tokenizer=tiny_bpe")
    assert len(models.load_tokenizer(offline.model, tmp_path)) <= offline.model.architecture.vocab_size
