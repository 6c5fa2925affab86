"""patch_model on tiny random BERT, RoBERTa, GPT-2 and Llama (and NF4 Llama) against the float64 reference."""

from __future__ import annotations

import json

import pytest
import torch
from reference import randomize_adapters, reference_model
from tiny_models import (
    FAMILIES,
    LLAMA_4BIT,
    exact_cpu_4bit,
    quantize_linears_4bit,
    tiny_batch,
    tiny_config,
    tiny_model,
)
from torch import nn

from muscle_fast import (
    DecoderScoreHead,
    MuScleConfig,
    MuScleLinear,
    export_peft,
    load_adapter,
    merge_and_unload,
    patch_model,
    save_adapter,
)

LABELS = torch.tensor([0, 2, 1])


def _patched(family: str, dtype: torch.dtype = torch.float32, **overrides) -> nn.Module:
    model = tiny_model(family, dtype=dtype)
    patch_model(model, MuScleConfig.for_model(model, **overrides) if overrides else None)
    randomize_adapters(model)
    return model


def _logits(model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_forward_matches_float64_reference(family):
    model = _patched(family)
    batch = tiny_batch(family)
    ref = reference_model(model)
    torch.testing.assert_close(_logits(model, batch).double(), _logits(ref, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_parameters_get_gradients(family):
    model = _patched(family).train()
    out = model(**tiny_batch(family), labels=LABELS)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and with_grad == trainable
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_and_report(family):
    model = tiny_model(family)
    total_before = sum(p.numel() for p in model.parameters())
    patch_model(model)
    rep = model.muscle_report
    cfg = model.muscle_config
    mods = {n: m for n, m in model.named_modules() if isinstance(m, MuScleLinear)}
    assert sorted(rep.lora_modules + rep.mslr_modules) == sorted(mods)
    assert all(len(mods[n].scales) == 1 and mods[n].r == cfg.lora_r for n in rep.lora_modules)
    assert all(tuple(mods[n].scales) == tuple(cfg.mslr_scales) and mods[n].r == 1 for n in rep.mslr_modules)
    assert len(rep.mslr_modules) == 1
    if family in ("gpt2", "llama"):
        assert isinstance(model.score, DecoderScoreHead)
        assert model.score.dense.base.weight.shape == (16, 48) and model.score.out_proj.weight.shape == (
            3,
            16,
        )
        assert not model.score.out_proj.weight.requires_grad
        assert rep.lora_modules and len(rep.lora_modules) == (2 if family == "gpt2" else 4)
    else:
        assert len(rep.lora_modules) == 4
        assert rep.total_params == total_before + sum(
            m.lora_A.numel() + m.lora_B.numel() for m in mods.values()
        )
    assert rep.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "patched" in str(rep)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_reproduces_logits_exactly(family, tmp_path):
    model = _patched(family)
    batch = tiny_batch(family)
    want = _logits(model, batch)
    save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == [
        "muscle_adapter.safetensors",
        "muscle_config.json",
    ]
    fresh = tiny_model(family, seed=123)  # same architecture; the random head and pooler differ
    base = tiny_model(family)
    for (n, p), (_, q) in zip(fresh.named_parameters(), base.named_parameters(), strict=True):
        if not n.startswith(("classifier", "score", "bert.pooler")):
            p.data.copy_(q.data)  # the "checkpoint" part is shared; the rest must come from the adapter
    load_adapter(fresh, tmp_path / "ad")  # patches it with the saved config
    torch.testing.assert_close(_logits(fresh, batch), want, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_same_logits(family):
    model = _patched(family)
    batch = tiny_batch(family)
    want = _logits(model, batch)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (MuScleLinear, DecoderScoreHead)) for m in plain.modules())
    assert not hasattr(plain, "muscle_config")
    if family in ("gpt2", "llama"):
        assert type(plain.score) is nn.Linear and plain.score.weight.shape == (3, 48)
    torch.testing.assert_close(_logits(plain, batch), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_peft_loads_in_real_peft(family, tmp_path):
    peft = pytest.importorskip("peft")
    model = _patched(family)
    batch = tiny_batch(family)
    want = _logits(model, batch)
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS"
    fresh = tiny_model(family, seed=321)
    base = tiny_model(family)
    for (n, p), (_, q) in zip(fresh.named_parameters(), base.named_parameters(), strict=True):
        if not n.startswith(("classifier", "score")):
            p.data.copy_(q.data)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-5, atol=1e-5)


def _bert_checkpoint_without_pooler(path):
    """A tiny BERT saved without pooler and head (as many checkpoints are); returns load(seed), whose
    pooler and classifier are drawn from that seed."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    src = tiny_model("bert", num_labels=2)
    src.config.save_pretrained(path)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith(("bert.pooler", "classifier"))}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})

    def load(seed: int):
        torch.manual_seed(seed)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()

    return load


def test_export_peft_carries_mslr_base_weights_missing_from_the_checkpoint(tmp_path):
    """A checkpoint without a pooler (common): a fresh load initializes pooler.dense at random, and
    a peft adapter that only holds LoRA factors for it cannot reproduce the model (5.9e-3 off)."""
    peft = pytest.importorskip("peft")
    load = _bert_checkpoint_without_pooler(tmp_path / "base")
    model = patch_model(load(0))
    randomize_adapters(model)
    batch = tiny_batch("bert")
    want = _logits(model, batch)
    export_peft(model, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "bert.pooler.dense" in cfg["modules_to_save"] and "bert.pooler.dense" not in cfg["target_modules"]
    loaded = peft.PeftModel.from_pretrained(load(1), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-5, atol=1e-5)


def test_lora_adapter_carries_a_pooler_missing_from_the_checkpoint(tmp_path, caplog):
    """LoRA only (no MSLR): pooler.dense stays frozen, but a checkpoint without it gives every load
    another random pooler, so the adapter must store it (eval drifted from defend: 0.02 off).
    An older adapter without it still loads, with a warning."""
    from safetensors.torch import load_file, save_file

    load = _bert_checkpoint_without_pooler(tmp_path / "base")
    model = patch_model(load(0), MuScleConfig.for_model(load(0), mslr_targets=[]))
    randomize_adapters(model)
    assert not isinstance(model.bert.pooler.dense, MuScleLinear)
    batch = tiny_batch("bert")
    want = _logits(model, batch)
    save_adapter(model, tmp_path / "ad")
    assert "bert.pooler.dense.weight" in load_file(str(tmp_path / "ad" / "muscle_adapter.safetensors"))
    torch.testing.assert_close(_logits(load_adapter(load(1), tmp_path / "ad"), batch), want, rtol=0, atol=0)
    f = tmp_path / "ad" / "muscle_adapter.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "pooler" not in k}, str(f))
    with caplog.at_level("WARNING", logger="muscle_fast"):
        load_adapter(load(1), tmp_path / "ad")
    assert "does not store ['bert.pooler.dense.bias', 'bert.pooler.dense.weight']" in caplog.text


def test_load_adapter_refuses_another_model_type_and_a_foreign_config(tmp_path):
    model = _patched("bert")
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match=r"made for a bert model; this one is roberta"):
        load_adapter(tiny_model("roberta"), tmp_path / "ad")
    cfg = tmp_path / "ad" / "muscle_config.json"
    meta = json.loads(cfg.read_text())
    del meta["muscle_config"]
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has no muscle_config object"):
        load_adapter(tiny_model("bert"), tmp_path / "ad")


def test_bf16_close_to_fp32():
    model32 = _patched("llama")
    model16 = _patched("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model16.named_parameters(), model32.named_parameters(), strict=True):
            p.copy_(q)
    batch = tiny_batch("llama")
    l32, l16 = _logits(model32, batch), _logits(model16, batch)
    assert l16.dtype == torch.bfloat16
    torch.testing.assert_close(l16.float(), l32, rtol=0.05, atol=0.05 * l32.abs().max().item())
    model16.train()
    model16(**batch, labels=LABELS).loss.backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 for p in model16.parameters() if p.requires_grad
    )


class TestFourBit:
    # the backend covers the dequantization too: torch = the exact torch path; triton = the kernel
    # (interpreter on the CPU) through the prepared call and the shared workspace
    @pytest.fixture(params=["torch", "triton"])
    def model(self, request):
        pytest.importorskip("bitsandbytes")
        from csrc_triton._common import kernels_run_on

        if request.param == "triton" and not kernels_run_on(torch.device("cpu")):
            pytest.skip("a CPU model: the kernels run on it only under the interpreter")
        model = quantize_linears_4bit(tiny_model("llama", **LLAMA_4BIT))
        patch_model(model, MuScleConfig.for_model(model, backend=request.param))
        randomize_adapters(model)
        return model

    def test_backend_picks_the_dequantizer(self, model, monkeypatch):
        import muscle_fast.ops.nf4 as nf4

        seen = []
        for name in ("dequantize_4bit_ref", "PreparedDequant4bit"):
            real = getattr(nf4, name)
            monkeypatch.setattr(nf4, name, lambda *a, _r=real, _n=name, **k: seen.append(_n) or _r(*a, **k))
        _logits(model, tiny_batch("llama"))
        backend = model.model.layers[0].self_attn.q_proj.backend
        assert seen and set(seen) == {"dequantize_4bit_ref" if backend == "torch" else "PreparedDequant4bit"}

    def test_forward_matches_reference_and_trains(self, model):
        q = model.model.layers[0].self_attn.q_proj
        assert q.kind == "4bit" and type(q.base).__name__ == "Linear4bit"
        batch = tiny_batch("llama")
        ref = reference_model(model)
        torch.testing.assert_close(_logits(model, batch).double(), _logits(ref, batch), rtol=1e-5, atol=1e-5)
        packed = q.base.weight.data.clone()
        model.train()
        model(**batch, labels=LABELS).loss.backward()
        assert torch.equal(q.base.weight.data, packed)  # the quantized weight is untouched
        assert q.lora_A.grad is not None and float(q.lora_A.grad.abs().sum()) > 0

    def test_fused_small_m_forward(self, model, monkeypatch):
        """With MUSCLE_FAST_FUSED_4BIT_MAX_M set, inputs of up to that many rows go through the fused
        dequantize + matmul kernel (interpreter on the CPU) and larger ones through dequantize + GEMM;
        both match the float64 reference, and the backward (the same code either way) trains."""
        import muscle_fast.ops.nf4 as nf4

        if model.model.layers[0].self_attn.q_proj.backend == "torch":
            pytest.skip("the fused kernel belongs to the triton backend")
        calls = []
        real = nf4.matmul_4bit
        monkeypatch.setattr(nf4, "matmul_4bit", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
        monkeypatch.setattr(nf4, "FUSED_4BIT_MAX_M", 14)
        ref = reference_model(model)
        small, large = tiny_batch("llama", batch=2), tiny_batch("llama", batch=3)  # 14 and 21 rows
        for batch, fused in ((small, True), (large, False)):
            calls.clear()
            got = _logits(model, batch).double()
            torch.testing.assert_close(got, _logits(ref, batch), rtol=1e-5, atol=1e-5)
            n_4bit = sum(isinstance(m, MuScleLinear) and m.kind == "4bit" for m in model.modules())
            assert n_4bit > 0 and calls == ([14] * n_4bit if fused else [])
        calls.clear()
        q = model.model.layers[0].self_attn.q_proj
        with torch.no_grad():
            assert q(torch.zeros(0, q.in_features)).shape == (0, q.out_features)
        assert calls == []  # no rows: the plain path, whatever the threshold
        model.train()
        model(**small, labels=LABELS[:2]).loss.backward()
        q = model.model.layers[0].self_attn.q_proj
        assert q.lora_A.grad is not None and float(q.lora_A.grad.abs().sum()) > 0

    def test_fused_threshold_env_is_checked(self, monkeypatch):
        from muscle_fast.ops import nf4

        monkeypatch.setenv("MUSCLE_FAST_FUSED_4BIT_MAX_M", "16")
        assert nf4._fused_4bit_max_m() == 16
        for bad in ("-1", "x"):
            monkeypatch.setenv("MUSCLE_FAST_FUSED_4BIT_MAX_M", bad)
            with pytest.raises(ValueError, match="MUSCLE_FAST_FUSED_4BIT_MAX_M must be an integer >= 0"):
                nf4._fused_4bit_max_m()

    def test_report_counts_4bit_params(self, model):
        assert model.muscle_report.total_params > model.muscle_report.trainable_params > 0

    def test_save_load(self, model, tmp_path):
        batch = tiny_batch("llama")
        want = _logits(model, batch)
        save_adapter(model, tmp_path)
        fresh = quantize_linears_4bit(tiny_model("llama", **LLAMA_4BIT))
        load_adapter(fresh, tmp_path)
        torch.testing.assert_close(_logits(fresh, batch), want, rtol=0, atol=0)

    def test_merge_is_refused(self, model):
        with pytest.raises(ValueError, match="4-bit base"):
            merge_and_unload(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, MuScleLinear)  # nothing half-merged


class TestFourBitLayer:
    """One bitsandbytes Linear4bit under MuScleLinear, where bitsandbytes' own forward is the oracle
    (zero-initialized B: the adapter adds nothing)."""

    @staticmethod
    def _linear4bit(i: int, o: int, storage: torch.dtype = torch.uint8, seed: int = 0):
        bnb = pytest.importorskip("bitsandbytes")
        torch.manual_seed(seed)
        lin = nn.Linear(i, o)
        q = bnb.nn.Linear4bit(i, o, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
        q.weight = bnb.nn.Params4bit(
            lin.weight.data.clone(), requires_grad=False, quant_type="nf4", quant_storage=storage, module=q
        )
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return exact_cpu_4bit(q.to("cpu"))

    @pytest.fixture(params=["torch", "triton"])
    def backend(self, request):
        from csrc_triton._common import kernels_run_on

        if request.param == "triton" and not kernels_run_on(torch.device("cpu")):
            pytest.skip("a CPU layer: the kernels run on it only under the interpreter")
        return request.param

    def test_lost_quant_state_is_recovered_like_bitsandbytes(self, backend):
        """FSDP re-wraps Parameters and drops ``weight.quant_state``; bitsandbytes restores it from the
        module, and so must we (it failed with an AttributeError)."""
        x = torch.randn(3, 64)
        for lose in ("rewrap", "none"):
            q = self._linear4bit(64, 32)
            want = q(x)
            if lose == "rewrap":
                q.weight = nn.Parameter(q.weight.data, requires_grad=False)
            else:
                q.weight.quant_state = None
            m = MuScleLinear(q, r=2, backend=backend)
            torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)
            assert q.weight.quant_state is q.quant_state
        q = self._linear4bit(64, 32)
        q.weight.quant_state = q.quant_state = None
        with pytest.raises(RuntimeError, match=r"Linear4bit\(64, 32\): the 4-bit weight has no quant_state"):
            MuScleLinear(q, r=2, backend=backend)(x)

    @pytest.mark.parametrize("shape", [(2, 1), (1, 2), (1, 1)], ids=lambda s: f"in{s[0]}-out{s[1]}")
    def test_one_or_two_element_weights(self, backend, shape):
        """A 2-value weight packs into one byte stored as [1, 1], which bitsandbytes' back-compat
        transpose rule (packed.shape[0] == 1) would turn around: the layer must not use it."""
        q = self._linear4bit(*shape)
        x = torch.randn(3, shape[0])
        m = MuScleLinear(q, r=1, backend=backend)
        for _ in range(2):  # the first call builds the prepared launch, the second replays it
            torch.testing.assert_close(m(x), q(x), rtol=1e-6, atol=1e-6)

    def test_workspace_is_freed_on_request(self, backend):
        import muscle_fast
        from muscle_fast.ops import nf4

        muscle_fast.free_4bit_workspaces()  # what other tests left
        m = MuScleLinear(self._linear4bit(64, 32), r=2, backend=backend)
        m(torch.randn(2, 64))
        assert bool(nf4._workspace) == (backend == "triton")
        muscle_fast.free_4bit_workspaces()
        assert not nf4._workspace and not len(nf4._prepared)
        m(torch.randn(2, 64))  # allocates again

    def test_param_count_any_storage_and_odd_sizes(self):
        from muscle_fast.patch import _param_count

        for storage in (torch.uint8, torch.bfloat16, torch.float32):
            assert _param_count(self._linear4bit(64, 32, storage)) == 64 * 32 + 32, storage
        assert _param_count(self._linear4bit(9, 7)) == 63 + 7  # 63 values in 32 bytes

    def test_quantized_score_head_is_replaced_in_compute_dtype(self):
        from types import SimpleNamespace

        from muscle_fast.patch import _replace_decoder_head

        model = nn.Module()
        model.score = self._linear4bit(64, 2)
        _replace_decoder_head(model, SimpleNamespace(head_hidden=16, head_dropout=0.0))
        assert isinstance(model.score, DecoderScoreHead)
        assert {p.dtype for p in model.score.parameters()} == {torch.float32}
        assert model.score(torch.randn(3, 64)).shape == (3, 2)


# ---------------------------------------------------------------------------------------------- bad input


def test_unknown_model_type_lists_known():
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model("distilbert", dim=32, n_layers=1, n_heads=2, hidden_dim=40, vocab_size=50)
    model = AutoModelForSequenceClassification.from_config(cfg)
    with pytest.raises(ValueError, match=r"model_type 'distilbert'.*\['bert', 'gpt2', 'llama', 'roberta'\]"):
        patch_model(model)
    patch_model(model, MuScleConfig.for_model(model, lora_targets=["q_lin", "v_lin"]))  # explicit: fine
    assert len(model.muscle_report.lora_modules) == 2


def test_target_matching_nothing_is_named():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="lora target 'qurey' matches no module"):
        patch_model(model, MuScleConfig.for_model(model, lora_targets=["qurey"]))


def test_patching_twice_is_an_error():
    model = tiny_model("bert")
    patch_model(model)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model)


def test_unsupported_layer_at_target():
    model = tiny_model("bert")
    with pytest.raises(TypeError, match=r"bert.embeddings.word_embeddings.*Embedding"):
        patch_model(model, MuScleConfig.for_model(model, lora_targets=["word_embeddings"]))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("lora_r", 0, "lora_r must be an integer >= 1"),
        ("mslr_scales", [], "must not be empty"),
        ("mslr_scales", [1, 0], "finite and > 0"),
        ("lora_alpha", -1.0, "lora_alpha must be > 0"),
        ("mslr_dropout", 1.5, r"mslr_dropout must be in \[0, 1\)"),
        ("backend", "cuda", "backend must be one of"),
    ],
)
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        MuScleConfig.for_model(tiny_model("bert"), **{field: value})


def test_loading_adapter_of_another_config(tmp_path):
    model = _patched("bert")
    save_adapter(model, tmp_path)
    other = tiny_model("bert")
    patch_model(other, MuScleConfig.for_model(other, lora_r=4))
    with pytest.raises(ValueError, match=r"another config; differing fields: lora_r \(saved 8, model 4\)"):
        load_adapter(other, tmp_path)


def test_loading_adapter_with_missing_key(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _patched("bert")
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "muscle_adapter.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A"))
    del tensors[key]
    save_file(tensors, tmp_path / "muscle_adapter.safetensors")
    with pytest.raises(KeyError, match=f"missing \\['{key}'\\]"):
        load_adapter(tiny_model("bert"), tmp_path)


def test_loading_adapter_with_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _patched("bert")
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "muscle_adapter.safetensors")
    tensors["classifier.weight"] = torch.zeros(5, 48)
    save_file(tensors, tmp_path / "muscle_adapter.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch for classifier.weight: saved \(5, 48\)"):
        load_adapter(tiny_model("bert"), tmp_path)


def test_adapter_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no muscle_config.json"):
        load_adapter(tiny_model("bert"), tmp_path / "nope")


def test_unpatched_model_operations_are_errors(tmp_path):
    for fn in (save_adapter, export_peft):
        with pytest.raises(ValueError, match="not patched"):
            fn(tiny_model("bert"), tmp_path)
    with pytest.raises(ValueError, match="not patched"):
        merge_and_unload(tiny_model("bert"))


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "family, hidden, scales",
    [
        ("bert", 48, [1, 4, 8, 12, 16, 20, 24, 28]),
        ("bert", 1024, list(range(1, 10))),
        ("roberta", 48, [1, 2, 4, 6, 8, 10, 12, 14, 16]),
        ("roberta", 1024, list(range(1, 10))),
        ("gpt2", 48, [1, 2, 3, 4]),
        ("llama", 48, [1, 2, 3, 4]),
    ],
)
def test_paper_defaults(family, hidden, scales):
    class M:
        config = tiny_config(family)

    if family == "gpt2":
        M.config.n_embd = hidden
    else:
        M.config.hidden_size = hidden
    cfg = MuScleConfig.for_model(M)
    assert cfg.mslr_scales == [float(k) for k in scales]
    enc = family in ("bert", "roberta")
    assert (cfg.lora_r, cfg.lora_alpha, cfg.mslr_r, cfg.mslr_alpha) == (
        (8, 32.0, 1, 6.0) if enc else (2, 8.0, 1, 4.0)
    )
    assert cfg.decoder_head is not enc


def test_config_json_round_trip():
    cfg = MuScleConfig.for_model(tiny_model("roberta"), lora_dropout=0.1)
    again = MuScleConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="unknown field"):
        MuScleConfig.from_dict({**cfg.to_dict(), "lora_rank": 3})


def test_from_pretrained_bitsandbytes_4bit(tmp_path, device):
    """The user's path: from_pretrained(..., BitsAndBytesConfig(load_in_4bit)) on a saved checkpoint."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    tiny_model("llama", **LLAMA_4BIT).save_pretrained(tmp_path / "ckpt")
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "ckpt", quantization_config=qcfg, device_map=device
    )
    exact_cpu_4bit(model)
    patch_model(model)
    randomize_adapters(model)
    assert all(
        m.kind == "4bit"
        for n, m in model.named_modules()
        if isinstance(m, MuScleLinear) and n.endswith(("q_proj", "v_proj"))
    )
    batch = {k: v.to(device) for k, v in tiny_batch("llama").items()}
    ref = reference_model(model).to(device)
    torch.testing.assert_close(_logits(model, batch).double(), _logits(ref, batch), rtol=1e-5, atol=1e-5)
    model.train()
    model(**batch, labels=LABELS.to(device)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("nested", [True, False], ids=["double-quant", "plain-absmax"])
def test_4bit_weight_repacked_by_bnb_cpu_inference_still_dequantizes(nested):
    """bnb's CPU eval shortcut repacks weights in place; a layer patched after that must still be right,
    with double quantization (bitsandbytes' default) or without (HF's BitsAndBytesConfig default, whose
    absmax bnb's inverse leaves transposed in bf16, which shows where K spans several blocks, as in
    down_proj here), whether MuScleLinear wraps it (q_proj) or not (down_proj)."""
    pytest.importorskip("bitsandbytes")
    model = quantize_linears_4bit(tiny_model("llama", **LLAMA_4BIT), nested=nested)
    layer = model.model.layers[0]
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu

    wants = []
    for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
        assert lin.weight.quant_state.nested is nested
        lin.support_avx512bf16_for_cpu = True  # force the shortcut whatever this CPU supports
        wants.append(dequantize(lin))
        lin.weight.data, lin.weight.quant_state = _convert_weight_packed_for_cpu(
            lin.weight.data, lin.weight.quant_state
        )
    assert layer.mlp.down_proj.in_features // layer.mlp.down_proj.weight.quant_state.blocksize > 1
    patch_model(model)
    from muscle_fast.ops.lowrank import base_weight

    gots = [base_weight(layer.self_attn.q_proj.base, "4bit", torch.float32), dequantize(layer.mlp.down_proj)]
    for got, want in zip(gots, wants, strict=True):
        # bnb's repacking keeps absmax at reduced precision (its inverse is "best effort"): agree to that
        torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-3 * want.abs().max().item())


def dequantize(layer):
    from muscle_fast.ops.nf4 import dequantize_4bit

    return dequantize_4bit(layer.weight.data, layer.weight.quant_state)
