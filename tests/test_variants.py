"""Every registered variant against its paper and, where peft has it, against peft — parametrized over the registry,
so a new variant is tested by adding its file and YAML. Tiny random RoBERTa unless a paper count needs the real shape."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from harness import adapters, models, rows
from harness.assemble import assemble, parameter_counts
from harness.adapters import VARIANTS, peft_bridge
from harness.adapters.inject import AdapterVariant
from harness.checkpoint import load_adapter, save_adapter
from harness.errors import ConfigError
from harness.inspect import compose_config, inspect
from harness.run import run
from harness.meters import SavedTensorMeter

from conftest import CONF_DIR, SQUAD_SHORT_WINDOWS, peft_twin

ADAPTERS = sorted(name for name, cls in VARIANTS.items() if issubclass(cls, AdapterVariant))
PEFT_ADAPTERS = [name for name in ADAPTERS if VARIANTS[name].peft_supported]
WITHOUT_PEFT = sorted(name for name, cls in VARIANTS.items() if not cls.peft_supported)
# Small enough for the tiny model: VeRA's default r=1024 is the paper's roberta-base setting. QLoRA computes in fp32
# here so that exact-equality tests read the same on every CPU (auto is bf16 only where the CPU has avx512_bf16).
TINY = {"vera": ["variant.r=32"], "qlora": ["variant.compute_dtype=fp32"]}


def build(cfg):
    """(model, variant, head) as run() builds them (`harness.assemble`, no tokenizer)."""
    setup = assemble(cfg, with_tokenizer=False)
    return setup.model, setup.variant, setup.head


def variant_cfg(make_cfg, name: str, *overrides: str, **kwargs):
    return make_cfg(f"variant={name}", *TINY.get(name, []), *overrides, **kwargs)


@torch.no_grad()
def perturb(model, tensors=None, seed: int = 1) -> None:
    """Move every trainable tensor (and `tensors`) off its init, so adapters change the output and merge/save matter."""
    generator = torch.Generator().manual_seed(seed)
    targets = [p for p in model.parameters() if p.requires_grad] + list(tensors or [])
    for tensor in {id(t): t for t in targets}.values():
        tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))


def ids_and_labels(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (3, 11), generator=generator), torch.tensor([0, 1, 1])


def strip_adapters(model):
    """The model with every adapter layer replaced by the base layer it wraps (QLoRA: the quantized base)."""
    for name, layer in list(adapters.adapter_layers(model)):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    return model


# ---- initialisation and trainable parameters ----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_output_equals_the_base_model_at_init(make_cfg, name):
    cfg = variant_cfg(make_cfg, name)
    model, _, _ = build(cfg)
    torch.manual_seed(cfg.seed)
    plain = models.load(cfg.model, "classification", 2, cfg.data.cache_dir, with_tokenizer=False).model
    ids, _ = ids_and_labels()
    model.eval(), plain.eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
        reference = strip_adapters(model)(input_ids=ids).logits  # the same base as stored (quantized for QLoRA)
        unquantized = plain(input_ids=ids).logits
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    if name == "qlora":  # NF4 moves the base a little; the adapter adds nothing on top
        assert 0 < (out - unquantized).abs().max() < 0.05
    else:
        torch.testing.assert_close(out, unquantized, rtol=0, atol=0)


@pytest.mark.parametrize("name", ADAPTERS)
def test_only_adapter_tensors_and_head_are_trainable(make_cfg, name):
    cfg = variant_cfg(make_cfg, name)
    model, variant, head = build(cfg)
    plain = models.load(cfg.model, "classification", 2, cfg.data.cache_dir, with_tokenizer=False).model
    plain_names = {n for n, _ in plain.named_parameters()}
    for param_name, param in model.named_parameters():
        in_head = adapters.base.is_under(param_name, head)
        if param.requires_grad:
            assert in_head or variant.is_adapter_param(param_name), param_name
            assert in_head or param_name not in plain_names, f"{param_name}: a base parameter is trainable"
        elif in_head:
            pytest.fail(f"head parameter {param_name} is frozen")


# Trainable adapter parameters of one adapted (d_in x d_out) layer at rank r, as each paper counts them.
PER_LAYER = {
    "lora": lambda d_in, d_out, r: r * (d_in + d_out), "rslora": lambda d_in, d_out, r: r * (d_in + d_out),
    "lora_plus": lambda d_in, d_out, r: r * (d_in + d_out), "delta_lora": lambda d_in, d_out, r: r * (d_in + d_out),
    "dylora": lambda d_in, d_out, r: r * (d_in + d_out), "qlora": lambda d_in, d_out, r: r * (d_in + d_out),
    "lora_fa": lambda d_in, d_out, r: r * d_out,  # B only
    "dora": lambda d_in, d_out, r: r * (d_in + d_out) + d_out,  # + a magnitude per output row
    "vera": lambda d_in, d_out, r: d_out + r,  # b and d; A and B are shared and frozen
}
PAPER_COUNTS = {"lora": 294_912, "lora_fa": 147_456, "dora": 313_344}  # roberta-base q,v r=8 (LoRA paper: 0.3M)


def count_overrides(name: str, r: int) -> list[str]:
    return [f"variant={name}", f"variant.r={r}", "variant.targets=[query,value]", "variant.all_linear=false"]


@pytest.mark.parametrize("name", ADAPTERS)
def test_trainable_counts_follow_the_paper_formula(make_cfg, name):
    if name not in PER_LAYER:
        pytest.skip(f"no paper formula recorded for variant {name!r}")
    model, _, head = build(make_cfg(*count_overrides(name, 4)))
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and not adapters.base.is_under(n, head))
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    assert trainable == 2 * layers * PER_LAYER[name](d, d, 4)


def test_vera_count_on_roberta_base_matches_the_paper():
    cfg = compose_config(["model=roberta_base", "model.init=random", "task=rte", "variant=vera"])  # r=1024
    assert inspect(cfg)["trainable_params_no_head"] == 43_008  # 24 x (768 + 1024), the paper's 0.043M


@pytest.mark.slow
@pytest.mark.parametrize("name", ADAPTERS)
def test_trainable_counts_on_roberta_base(name):
    if name not in PER_LAYER:
        pytest.skip(f"no paper formula recorded for variant {name!r}")
    r = 1024 if name == "vera" else 8
    report = inspect(compose_config(["model=roberta_base", "model.init=random", "task=rte", *count_overrides(name, r)]))
    assert report["trainable_params_no_head"] == 24 * PER_LAYER[name](768, 768, r)
    assert report["trainable_params_no_head"] == PAPER_COUNTS.get(name, report["trainable_params_no_head"])


def test_vera_count_on_roberta_large_matches_the_paper():
    cfg = compose_config(["model=roberta_large", "model.init=random", "task=rte", "variant=vera", "variant.r=256"])
    assert inspect(cfg)["trainable_params_no_head"] == 61_440  # 48 x (1024 + 256), the paper's 0.061M


# ---- merge, save and reload -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADAPTERS)
def test_merge_equals_the_unmerged_forward_and_unmerge_restores(make_cfg, name):
    model, _, _ = build(variant_cfg(make_cfg, name))
    perturb(model)
    model.eval()
    ids, _ = ids_and_labels()
    layers = [layer for _, layer in adapters.adapter_layers(model)]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        for layer in layers:
            layer.merge()
        merged = model(input_ids=ids).logits
        for layer in layers:
            layer.unmerge()
        restored = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ADAPTERS)
def test_saved_adapter_reloads_exactly(make_cfg, name, tmp_path):
    cfg = variant_cfg(make_cfg, name)
    model, variant, _ = build(cfg)
    perturb(model, variant.extra_state(model).values())  # Delta-LoRA's W, LoRA-FA's A, VeRA's projections too
    save_adapter(model, variant, tmp_path / "adapter.safetensors")
    fresh, _, _ = build(cfg)  # the same base; its adapter moved elsewhere: everything must come from the file
    perturb(fresh, variant.extra_state(fresh).values(), seed=12345)
    load_adapter(fresh, tmp_path / "adapter.safetensors")
    ids, _ = ids_and_labels()
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


# ---- against peft ------------------------------------------------------------------------------------
def peft_tensors(model, variant) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters by the key peft's files use: the same key for our layers and peft's."""
    return {peft_bridge.peft_key(n, variant): p for n, p in model.named_parameters()
            if variant.adapter_attribute(n) is not None}


@pytest.mark.parametrize("name", PEFT_ADAPTERS)
def test_our_layers_and_pefts_give_the_same_outputs_and_gradients(make_cfg, name):
    ours, variant, _ = build(variant_cfg(make_cfg, name))
    theirs, peft_variant, _ = build(variant_cfg(make_cfg, name, "variant.impl=peft"))
    ours_by_key, theirs_by_key = peft_tensors(ours, variant), peft_tensors(theirs, peft_variant)
    assert ours_by_key.keys() == theirs_by_key.keys() and ours_by_key
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == \
           sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    perturb(ours)
    with torch.no_grad():
        for key, param in ours_by_key.items():
            theirs_by_key[key].copy_(param)
        theirs.classifier.load_state_dict(ours.classifier.state_dict())
        for ours_shared, theirs_shared in zip(variant.peft_shared_tensors(ours).values(),
                                              peft_variant.peft_shared_tensors(theirs).values()):
            assert torch.equal(ours_shared, theirs_shared)  # VeRA: the same seed draws the same matrices
    ids, labels = ids_and_labels()
    ours.eval(), theirs.eval()  # no dropout: both see the same function
    out_ours, out_theirs = ours(input_ids=ids, labels=labels), theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for key, param in ours_by_key.items():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, theirs_by_key[key].grad, msg=key)
        else:
            assert theirs_by_key[key].grad is None, key


@pytest.mark.parametrize("impl", ["ours", "peft"])
@pytest.mark.parametrize("name", PEFT_ADAPTERS)
def test_peft_loads_what_the_harness_saved_and_predicts_the_same(make_cfg, name, impl, tmp_path):
    from peft import PeftModel

    cfg = variant_cfg(make_cfg, name, f"variant.impl={impl}")
    setup = assemble(cfg, with_tokenizer=False)
    model, variant = setup.model, setup.variant
    perturb(model)
    variant.save_other_formats(model, tmp_path, setup.head, setup.targeted)
    torch.manual_seed(cfg.seed)
    base = models.load(cfg.model, "classification", 2, cfg.data.cache_dir, with_tokenizer=False).model
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft_adapter").eval()
    ids, _ = ids_and_labels()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name", PEFT_ADAPTERS)
def test_the_peft_config_written_without_peft_loads_as_the_one_peft_builds(make_cfg, name, tmp_path):
    """The run writes peft's adapter_config.json without importing peft (0.1 s of every run): peft must
    load it as exactly the config it builds itself from the same fields, every default included."""
    from peft import PeftConfig

    setup = assemble(variant_cfg(make_cfg, name), with_tokenizer=False)
    setup.variant.save_other_formats(setup.model, tmp_path, setup.head, setup.targeted)
    loaded = PeftConfig.from_pretrained(str(tmp_path / "peft_adapter"))
    built = peft_bridge.peft_config(setup.variant, setup.targeted)
    built.modules_to_save, built.inference_mode = list(setup.head), True
    assert loaded.to_dict() == built.to_dict()


def test_lora_plus_groups_match_pefts_helper_for_A_and_B(make_cfg):
    groups = {}
    for impl in ("ours", "peft"):
        model, variant, _ = build(make_cfg("variant=lora_plus", f"variant.impl={impl}"))
        lr_of = {id(p): g["lr"] for g in variant.param_groups(model, 1e-3, 0.1) for p in g["params"]}
        groups[impl] = {peft_bridge.peft_key(n, variant): lr_of[id(p)] for n, p in model.named_parameters()
                        if variant.adapter_attribute(n) is not None}
    assert groups["ours"] == groups["peft"]
    assert {k: v for k, v in groups["ours"].items() if k.endswith("lora_B.weight")} and all(
        v == pytest.approx(16e-3 if k.endswith("lora_B.weight") else 1e-3) for k, v in groups["ours"].items())


# ---- one test per method's own claim -----------------------------------------------------------------
def test_lora_fa_saves_one_input_less_per_distinct_adapter_input_than_lora(make_cfg):
    """Query and value read the same input: LoRA keeps it once per layer for A's gradient, LoRA-FA never."""
    ids, labels = ids_and_labels()
    saved = {}
    for name in ("lora", "lora_fa"):
        model, _, _ = build(make_cfg(f"variant={name}", "variant.dropout=0.0"))
        model.train()
        with SavedTensorMeter(model) as meter:
            model(input_ids=ids, labels=labels).loss.backward()
        saved[name] = meter.bytes
    config = model.config
    one_input = ids.numel() * config.hidden_size * 4  # batch x tokens x d_in, fp32
    assert saved["lora"] - saved["lora_fa"] == config.num_hidden_layers * one_input


@pytest.mark.parametrize("start_step,updates", [(0, 1), (1, 0)])
def test_delta_lora_weight_after_two_steps_equals_the_formula(make_cfg, start_step, updates):
    model, variant, _ = build(make_cfg("variant=delta_lora", f"variant.start_step={start_step}",
                                       "variant.update_ratio=0.5", "variant.alpha=16"))
    optimizer = torch.optim.AdamW(variant.param_groups(model, 1e-2, 0.0))
    layers = dict(adapters.adapter_layers(model))
    w0 = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    products = []  # B A after 0, 1, 2 steps
    ids, labels = ids_and_labels()
    state = variant.start_training(model, seed=0)
    for step in range(2):
        products.append({n: (layer.lora_B @ layer.lora_A).detach().clone() for n, layer in layers.items()})
        variant.before_step(model, step, state)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        variant.after_step(model, step, state)
    products.append({n: (layer.lora_B @ layer.lora_A).detach().clone() for n, layer in layers.items()})
    rate = 0.5 * 16 / 8  # lambda * alpha / r
    for n, layer in layers.items():
        expected = w0[n] + rate * (products[2][n] - products[1][n]) * updates  # only step t=1 > K=0 updates W
        assert not layer.base.weight.requires_grad and layer.base.weight.grad is None
        assert all(layer.base.weight is not p for g in optimizer.param_groups for p in g["params"])
        torch.testing.assert_close(layer.base.weight, expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(products[2][n], products[1][n])


def test_dylora_at_rank_b_equals_a_lora_holding_the_first_b_components(make_cfg):
    model, variant, _ = build(make_cfg("variant=dylora", "variant.r=8", "variant.alpha=8"))
    perturb(model)
    b = 3
    lora, _, _ = build(make_cfg("variant=lora", f"variant.r={b}", "variant.alpha=8"))
    with torch.no_grad():
        for name, layer in adapters.adapter_layers(lora):
            dy = model.get_submodule(name)
            layer.lora_A.copy_(dy.lora_A[:b])
            layer.lora_B.copy_(dy.lora_B[:, :b])
        lora.classifier.load_state_dict(model.classifier.state_dict())
    ids, _ = ids_and_labels()
    model.eval(), lora.eval()
    settings = dict(variant.eval_settings(model))
    assert list(settings) == [None, "r=1", "r=2", "r=4", "r=8"]
    with torch.no_grad(), variant.at_rank(model, b):
        torch.testing.assert_close(model(input_ids=ids).logits, lora(input_ids=ids).logits)
    assert all(layer.active_rank == 8 for _, layer in adapters.adapter_layers(model))  # back at full rank


def test_dylora_samples_every_rank_from_the_generator(make_cfg):
    model, variant, _ = build(make_cfg("variant=dylora", "variant.r=4"))
    drawn = set()
    for step in range(60):
        variant.before_step(model, step, variant.start_training(model, seed=step))
        ranks = {layer.active_rank for _, layer in adapters.adapter_layers(model)}
        assert len(ranks) == 1  # one rank for all layers per step
        drawn |= ranks
    assert drawn == {1, 2, 3, 4}


@pytest.mark.parametrize("frozen", [True, False])
def test_dylora_frozen_mode_trains_only_the_sampled_component_as_the_reference_does(make_cfg, frozen):
    """The reference (DyLoRA/loralib/DyLoRA.py, `dynamic.forward` with frozen=True) detaches components 1..b-1:
    a step at rank b sends gradient to row b of A and column b of B only. frozen=false trains all b leading ones."""
    model, variant, _ = build(make_cfg("variant=dylora", "variant.r=4", f"variant.frozen={str(frozen).lower()}"))
    perturb(model)  # B off zero, so A gets gradient too
    ids, labels = ids_and_labels()
    model.train()
    for b in (1, 3, 4):
        variant.set_rank(model, b)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        for _, layer in adapters.adapter_layers(model):
            rows_with_grad = layer.lora_A.grad.abs().sum(1).nonzero().flatten().tolist()
            cols_with_grad = layer.lora_B.grad.abs().sum(0).nonzero().flatten().tolist()
            expected = [b - 1] if frozen else list(range(b))
            assert rows_with_grad == expected and cols_with_grad == expected, (b, rows_with_grad, cols_with_grad)


def test_dylora_frozen_mode_keeps_the_forward_of_all_b_leading_components(make_cfg):
    """Detaching changes the gradient, not the output: both modes compute (alpha / b) B[:, :b] A[:b] x."""
    frozen, variant, _ = build(make_cfg("variant=dylora", "variant.r=4", "variant.frozen=true"))
    free, _, _ = build(make_cfg("variant=dylora", "variant.r=4", "variant.frozen=false"))
    perturb(frozen), free.load_state_dict(frozen.state_dict())
    ids, _ = ids_and_labels()
    frozen.train(), free.train()
    for model in (frozen, free):
        variant.set_rank(model, 3)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    torch.testing.assert_close(frozen(input_ids=ids).logits, free(input_ids=ids).logits)


def test_vera_matrices_are_one_tensor_and_the_same_for_the_same_seed(make_cfg):
    cfg = make_cfg("variant=vera", "variant.r=32", "variant.seed=7")
    model, variant, _ = build(cfg)
    layers = [layer for _, layer in adapters.adapter_layers(model)]
    pointers = {(layer.projections()[0].data_ptr(), layer.projections()[1].data_ptr()) for layer in layers}
    assert len(layers) == 4 and len(pointers) == 1  # every layer reads the same storage
    shared = [b for n, b in model.named_buffers() if n.split(".")[-1] in ("vera_A", "vera_B")]
    assert len(shared) == 2  # held once: the model lists one A and one B
    again, _, _ = build(make_cfg("variant=vera", "variant.r=32", "variant.seed=7", "seed=999"))  # another run seed
    other, _, _ = build(make_cfg("variant=vera", "variant.r=32", "variant.seed=8"))
    first = lambda m: next(layer for _, layer in adapters.adapter_layers(m)).vera_projections  # noqa: E731
    assert torch.equal(first(model).vera_A, first(again).vera_A) and torch.equal(first(model).vera_B, first(again).vera_B)
    assert not torch.equal(first(model).vera_A, first(other).vera_A)


def test_qlora_quantizes_the_base_and_reports_its_bytes(make_cfg):
    nf4 = assemble(make_cfg("variant=qlora"), with_tokenizer=False)
    model, head, facts = nf4.model, nf4.head, nf4.facts
    assert facts["quant"] == "nf4" and facts["quant_backend"] == "torchao" and facts["double_quant"]
    assert facts["base_weight_bytes_after"] < facts["base_weight_bytes_before"] / 6  # 4-bit codes + scales vs fp32
    for name, layer in adapters.adapter_layers(model):
        assert layer.lora_A.dtype == torch.float32 and type(layer.base.weight).__name__ == "NF4Tensor"
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if adapters.base.is_under(n, head))
    int8_setup = assemble(make_cfg("variant=qlora", "variant.quant=int8"), with_tokenizer=False)
    int8 = int8_setup.model
    assert facts["base_weight_bytes_after"] < int8_setup.facts["base_weight_bytes_after"] \
        < facts["base_weight_bytes_before"] / 3
    lora, _, _ = build(make_cfg("variant=lora"))
    # the packed base still stands for the same matrices: the total counts them as LoRA's does
    assert parameter_counts(model, head) == parameter_counts(int8, head) == parameter_counts(lora, head)


def test_qlora_computes_in_bf16_where_the_device_has_it_and_records_the_choice(make_cfg, monkeypatch):
    from harness import hardware
    from harness.adapters import qlora

    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    assert qlora.resolve_compute_dtype("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    assert qlora.resolve_compute_dtype("auto", torch.device("cpu")) == "bf16"
    assert qlora.resolve_compute_dtype("fp32", torch.device("cpu")) == "fp32"
    bf16 = assemble(make_cfg("variant=qlora", "variant.compute_dtype=bf16"), with_tokenizer=False)
    assert bf16.facts["compute_dtype"] == "bf16"
    layer = next(layer for _, layer in adapters.adapter_layers(bf16.model))
    seen = []
    layer.base.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    x = torch.randn(2, 5, layer.in_features)
    exact = x @ layer.base.dequantized_weight(torch.float32).T + layer.base.bias
    out = layer.base(x)
    assert seen == [torch.float32]  # cast back to the input's dtype, as bitsandbytes' Linear4bit does
    assert 0 < (out - exact).abs().max() < 0.05 * exact.abs().max()  # computed in bf16: close, not exact
    fp32 = assemble(make_cfg("variant=qlora", "variant.compute_dtype=fp32"), with_tokenizer=False)
    fp32_layer = next(layer for _, layer in adapters.adapter_layers(fp32.model))
    torch.testing.assert_close(fp32_layer.base(x), x @ fp32_layer.base.dequantized_weight(torch.float32).T
                               + fp32_layer.base.bias)
    assert fp32.facts["compute_dtype"] == "fp32"


# ---- through the trainer -----------------------------------------------------------------------------
def test_delta_lora_that_would_never_update_w_is_a_config_error_not_a_lora_row(make_cfg):
    """Steps are t = 0..3 and W moves after those with t > K: K=3 never moves it, K=2 moves it once. Found before
    the first step, it is an error, not a row (docs/failures.md)."""
    with pytest.raises(ConfigError) as err:
        run(make_cfg("variant=delta_lora", "variant.start_step=3", "train.max_steps=4"))
    assert "variant.start_step=3" in str(err.value) and "4 optimizer steps" in str(err.value)
    assert "below 3" in str(err.value)
    assert run(make_cfg("variant=delta_lora", "variant.start_step=2", "train.max_steps=4"))["status"] == "ok"


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_trains_through_run_and_writes_its_row(make_cfg, name, monkeypatch):
    """...and the variant object ends the run as it was built: a run's state (targets, head, DyLoRA's generator,
    Delta-LoRA's previous factors, QLoRA's backend) lives in what prepare and start_training return, not on it."""
    overrides = {"delta_lora": ["variant.start_step=0"], "dylora": ["variant.eval_ranks=[1,2]"]}.get(name, [])
    cfg = variant_cfg(make_cfg, name, "train.max_steps=2", *overrides)
    built, real_build = [], adapters.build

    def build_and_keep(variant_cfg):
        variant = real_build(variant_cfg)
        built.append((variant, dict(vars(variant))))
        return variant

    monkeypatch.setattr(adapters, "build", build_and_keep)
    row = run(cfg)
    assert row["status"] == "ok", row.get("error")
    [(variant, as_built)] = built
    assert vars(variant) == as_built and as_built.keys() == {"cfg"}
    assert row["saved_activation_bytes"] > 0 and row["trainable_params"] > 0
    artifacts = rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"])
    saved = load_file(artifacts / "adapter.safetensors")
    if name == "dylora":
        assert set(json.loads(row["rank_scores_json"])) == {"r=1", "r=2"}
    if name == "qlora":
        extra = json.loads(row["extra_json"])
        assert row["base_weight_bytes"] < extra["base_weight_bytes_before"]
    if name == "delta_lora":
        assert any(key.endswith(".base.weight") for key in saved)  # the updated W is part of the adapter
    if VARIANTS[name].peft_supported:
        peft_folder = artifacts / "peft_adapter"
        assert (peft_folder / "adapter_config.json").exists() and (peft_folder / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_trains_on_squad_v2_with_its_span_head_saved(make_cfg, squad_data_dir, name):
    """Injection is task-agnostic: every variant (baselines too) runs extractive QA and saves qa_outputs."""
    overrides = {"delta_lora": ["variant.start_step=0"], "dylora": ["variant.eval_ranks=[1,2]"]}.get(name, [])
    cfg = variant_cfg(make_cfg, name, "task=squad_v2", *SQUAD_SHORT_WINDOWS, "train.max_steps=2",
                      "data.max_eval_samples=12", *overrides, data_dir=squad_data_dir)
    row = run(cfg)
    assert row["status"] == "ok", row.get("error")
    assert 0 <= row["metric_f1"] <= 100 and row["metric_HasAns_f1"] is not None
    saved = load_file(rows.artifacts_dir(cfg.results_dir, cfg.sweep_name, row["run_key"]) / "adapter.safetensors")
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= set(saved)


# ---- bad configs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [0, -1])
@pytest.mark.parametrize("name", ADAPTERS)
def test_non_positive_rank_is_rejected(make_cfg, name, r):
    with pytest.raises(ConfigError, match="variant.r"):
        adapters.build(variant_cfg(make_cfg, name, f"variant.r={r}").variant)


@pytest.mark.parametrize("alpha", [0, -8])
@pytest.mark.parametrize("name", [n for n in ADAPTERS if n != "vera"])
def test_non_positive_alpha_is_rejected(make_cfg, name, alpha):
    with pytest.raises(ConfigError, match="variant.alpha"):
        adapters.build(variant_cfg(make_cfg, name, f"variant.alpha={alpha}").variant)


@pytest.mark.parametrize("name", WITHOUT_PEFT)
def test_impl_peft_is_rejected_where_peft_lacks_the_variant(make_cfg, name):
    with pytest.raises(ConfigError, match="peft has no implementation"):
        adapters.build(variant_cfg(make_cfg, name, "variant.impl=peft").variant)


@pytest.mark.parametrize("overrides,match", [
    (["variant=lora_plus", "variant.lr_ratio=0.5"], "variant.lr_ratio"),
    (["variant=lora_fa", "+variant.lr_ratio=16"], "LoRA-FA does not train A"),
    (["variant=vera", "variant.targets=[LayerNorm]"], "nn.Linear"),
    (["variant=vera", "+variant.alpha=8"], "VeRA has no alpha|vera has no alpha"),
    (["variant=delta_lora", "variant.dropout=0.1"], "no dropout"),
    (["variant=dylora", "variant.eval_ranks=[1,16]"], "variant.eval_ranks"),
    (["variant=qlora", "variant.quant=fp8"], "variant.quant"),
])
def test_bad_variant_configs_say_how_to_fix_them(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        build(make_cfg(*overrides))


def test_qlora_without_a_backend_is_a_clear_error(make_cfg, monkeypatch):
    """Hide torchao (and bitsandbytes) from imports: building QLoRA must fail with install instructions."""
    for module in [m for m in sys.modules if m.split(".")[0] in ("torchao", "bitsandbytes")] + ["torchao", "bitsandbytes"]:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ConfigError, match="needs a quantization backend.*pip install torchao"):
        adapters.build(make_cfg("variant=qlora").variant)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_qlora_bitsandbytes_backend_without_cuda_is_a_clear_error(make_cfg):
    with pytest.raises(ConfigError, match="variant.backend=bitsandbytes cannot run here"):
        adapters.build(make_cfg("variant=qlora", "variant.backend=bitsandbytes").variant)


@pytest.mark.parametrize("model,expected", [("roberta_base", 294_912), ("roberta_large", 786_432)])
def test_lora_r8_query_value_matches_the_lora_paper(model, expected):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", "model.init=random", "task=rte"])
    report = inspect(cfg)
    assert report["trainable_params_no_head"] == expected
    n_layers = 12 if model == "roberta_base" else 24
    assert len(report["targeted_modules"]) == 2 * n_layers


def test_head_is_trainable_and_counted_separately(make_cfg):
    cfg = make_cfg("variant=head")
    setup = assemble(cfg)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)


def test_bitfit_trains_biases_and_head_only(make_cfg):
    setup = assemble(make_cfg("variant=bitfit"))
    for name, p in setup.model.named_parameters():
        assert p.requires_grad == (name.endswith(".bias") or name.startswith("classifier.")), name


def test_train_biases_and_layer_norms_options(make_cfg):
    setup = assemble(make_cfg("variant.train_biases=true", "variant.train_layer_norms=true"))
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert any("LayerNorm.weight" in n for n in trainable)
    assert any(n.endswith("attention.self.key.bias") for n in trainable)
    assert not any(n.endswith("key.weight") for n in trainable)


def test_all_linear_targets_every_encoder_linear_but_never_the_head(make_cfg):
    setup = assemble(make_cfg("variant.all_linear=true"))
    adapted = [n for n, _ in adapters.adapter_layers(setup.model)]
    assert len(adapted) == 2 * 6  # q, k, v, attention out, intermediate, output per layer
    assert not any(n.startswith("classifier") for n in adapted)


def test_lora_matches_peft_outputs_and_gradients(make_cfg):
    cfg = make_cfg("variant.r=4", "variant.alpha=8")
    ours = assemble(cfg)
    torch.manual_seed(0)
    for _, layer in adapters.adapter_layers(ours.model):
        torch.nn.init.normal_(layer.lora_B)  # non-zero B so the adapter path matters
    theirs = peft_twin(cfg, ours)
    ids = torch.randint(3, 500, (3, 11))
    labels = torch.tensor([0, 1, 1])
    ours.model.eval(), theirs.eval()
    out_ours = ours.model(input_ids=ids, labels=labels)
    out_theirs = theirs(input_ids=ids, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for name, layer in adapters.adapter_layers(ours.model):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad)


def test_unmatched_targets_fail_listing_what_exists(make_cfg):
    with pytest.raises(ConfigError, match=r"matched no module.*query"):
        assemble(make_cfg("variant.targets=[q_proj]"))


def test_regex_targets(make_cfg):
    setup = assemble(make_cfg(r"variant.targets=['re:.*layer\.0\.attention\.self\.(query|key)']"))
    assert [n.split(".")[-1] for n, _ in adapters.adapter_layers(setup.model)] == ["query", "key"]


@pytest.mark.parametrize("overrides,match", [
    (["variant.name=lorax"], "unknown; registered variants"),
    (["variant.r=0"], r"variant.r=0"),
    (["variant.r=-4"], r"variant.r=-4"),
    (["variant.alpha=0"], r"variant.alpha=0"),
    (["variant.dropout=1.5"], r"variant.dropout"),
    (["variant.targets=[]"], r"variant.targets"),
])
def test_bad_variant_configs_raise_clear_errors(make_cfg, overrides, match):
    with pytest.raises(ConfigError, match=match):
        adapters.build(make_cfg(*overrides).variant)


def test_registry_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        adapters.register("lora")(type("Again", (adapters.Variant,), {}))


def test_merge_matches_unmerged_and_removes_the_adapter_cost(make_cfg):
    setup = assemble(make_cfg())
    model = setup.model.eval()
    for _, layer in adapters.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    ids = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        for _, layer in adapters.adapter_layers(model):
            layer.merge()
        merged = model(input_ids=ids).logits
        for _, layer in adapters.adapter_layers(model):  # merged inference never touches the adapter
            layer.delta = lambda *a: pytest.fail("delta called on a merged layer")
        model(input_ids=ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
