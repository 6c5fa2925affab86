"""Inputs that used to pass silently (or fail deep inside torch) now fail at the door, naming the
field, module or row at fault; a failed ``patch_model`` leaves the model as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import HashTokenizer, make_rows
from tiny_models import tiny_model
from torch import nn

from muscle_fast import MuScleConfig, MuScleLinear, load_adapter, patch_model, save_adapter
from muscle_fast.adapter import read_adapter_config
from muscle_fast.align import GradientAligner
from muscle_fast.errors import ConfigError
from muscle_fast.evaluation import as_rows
from muscle_fast.experiment.loading import load_classifier
from muscle_fast.train import TrainConfig, train_muscle

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", INF),
        ("min_ref_loss", NAN),
        ("min_ref_loss", INF),
        ("min_ref_grad_norm", NAN),
        ("min_ref_grad_norm", -1.0),
        ("max_raw_grad_ratio", 5.0),
        ("max_raw_grad_ratio", -0.1),
        ("max_raw_grad_ratio", NAN),
        ("ga_epoch", -3),
        ("seed", 2**70),
        ("seed", -(2**63) - 1),
        ("seed", 2**64 - 1),
    ],
)
def test_train_config_out_of_range(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field", ["min_ref_loss", "min_ref_grad_norm", "max_raw_grad_ratio"])
def test_aligner_refuses_a_nan_threshold(field):
    p = nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=f"GradientAligner {field} must be"):
        GradientAligner([p], backend="torch", **{field: NAN})


def _train_args():
    model = tiny_model("bert", num_labels=2)
    patch_model(model)
    return model, HashTokenizer(), make_rows(16, 0), make_rows(8, 1), make_rows(8, 2)


def test_train_muscle_checks_the_config_it_is_given():
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False)
    cfg.batch_size = 0  # the dataclass is mutable: the check runs again at the call
    with pytest.raises(ValueError, match=r"TrainConfig\.batch_size must be > 0"):
        train_muscle(*_train_args(), cfg)
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train_muscle(*_train_args(), {"epochs": 1})


def test_eval_set_labels_are_checked():
    cfg = TrainConfig(epochs=1, batch_size=4, progress=False, align=False)
    with pytest.raises(ValueError, match=r"eval_sets\['asr'\] has labels outside \[0, 2\): \[7\]"):
        train_muscle(*_train_args(), cfg, eval_sets={"asr": [("w1 w2", 7)] * 4})


@pytest.mark.parametrize(
    "rows",
    [["w1 w2"], [("x", 0.7)], [("x", 1, 0)], [("x",)], [None], [("x", "pos")], [("x", True)], "abc"],
    ids=["bare-string", "float-label", "three-fields", "one-field", "none", "text-label", "bool", "str"],
)
def test_malformed_rows(rows):
    with pytest.raises(ValueError, match="train_rows: "):
        as_rows(rows, "train_rows")


def test_row_forms_that_hold_a_text_and_an_integer_label():
    rows = [
        ("a", 1),
        ["b", np.int64(0)],
        {"sentence": "c", "label": 1.0},
        np.array(["d", 1], dtype=object),
        ("e", torch.tensor(1)),
        ("f", np.float32(0)),
        ("g", np.array(1)),
    ]
    assert as_rows(rows, "t") == [("a", 1), ("b", 0), ("c", 1), ("d", 1), ("e", 1), ("f", 0), ("g", 1)]


def test_head_module_that_matches_nothing():
    model = tiny_model("bert", num_labels=2)
    with pytest.raises(ValueError, match="head module 'classifer' matches no module"):
        patch_model(model, head_modules=["classifer"])
    patch_model(model, head_modules=[])  # a model without a task head says so
    assert model.muscle_report.head_modules == []


def _state(model: nn.Module) -> tuple[list, dict]:
    return [(n, type(m)) for n, m in model.named_modules()], {
        n: p.requires_grad for n, p in model.named_parameters()
    }


@pytest.mark.parametrize(
    "family, overrides, error",
    [
        ("gpt2", {"lora_targets": ["c_atn"]}, ValueError),  # after the decoder head was built
        ("bert", {"lora_targets": ["query", "attention.output"]}, TypeError),  # after query was wrapped
    ],
)
def test_failed_patch_leaves_the_model_as_it_was(family, overrides, error):
    model = tiny_model(family, num_labels=2)
    before = _state(model)
    head = getattr(model, "score", None)
    with pytest.raises(error):
        patch_model(model, **overrides)
    assert _state(model) == before
    assert getattr(model, "score", None) is head
    patch_model(model)  # and patches normally afterwards
    assert model.muscle_report.lora_modules


def test_model_keeps_its_own_copy_of_the_config(tmp_path):
    model = tiny_model("bert", num_labels=2)
    cfg = MuScleConfig.for_model(model)
    patch_model(model, cfg)
    cfg.lora_alpha = 1.0  # the caller's object changes later
    assert model.muscle_config is not cfg and model.muscle_config.lora_alpha != 1.0
    save_adapter(model, tmp_path)
    assert read_adapter_config(tmp_path).lora_alpha == model.muscle_config.lora_alpha


def test_config_of_another_model_type():
    cfg = MuScleConfig.for_model(tiny_model("roberta", num_labels=2))
    with pytest.raises(ValueError, match="config is for a 'roberta' model"):
        patch_model(tiny_model("bert", num_labels=2), cfg)


def test_wrong_argument_types_are_named():
    with pytest.raises(TypeError, match="model must be a torch nn.Module, got str"):
        patch_model("bert")
    with pytest.raises(TypeError, match="cfg must be a MuScleConfig"):
        patch_model(tiny_model("bert", num_labels=2), {"lora_targets": ["query"]})
    with pytest.raises(TypeError, match="load_adapter: model must be a torch nn.Module"):
        load_adapter("bert", "adapter")


@pytest.mark.parametrize(
    "x",
    [
        torch.full((2, 8), 3, dtype=torch.long),
        torch.ones(2, 8, dtype=torch.bool),
        torch.tensor(1.0),
        [[1.0] * 8],
    ],
    ids=["int64", "bool", "0-d", "list"],
)
def test_layer_input_must_be_a_float_tensor(x):
    layer = MuScleLinear(nn.Linear(8, 4).requires_grad_(False), (1.0,), r=2, alpha=4.0, name="q")
    with pytest.raises(TypeError, match=r"MuScleLinear\(q\): input must be a floating-point tensor"):
        layer(x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scales": "12"}, "scales must be a sequence of positive numbers"),
        ({"scales": [1.0, True]}, "scales must be a sequence of positive numbers"),
        ({"alpha": "1"}, "alpha must be > 0"),
        ({"alpha": True}, "alpha must be > 0"),
        ({"dropout": None}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_layer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MuScleLinear(nn.Linear(8, 4).requires_grad_(False), **kwargs)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("decoder_head", "no", "decoder_head must be true or false"),
        ("decoder_head", 2, "decoder_head must be true or false"),
        ("lora_alpha", True, "lora_alpha must be > 0"),
        ("lora_dropout", False, r"lora_dropout must be in \[0, 1\)"),
        ("model_type", 3, "model_type must be a string or None"),
    ],
)
def test_config_values_of_the_wrong_kind(field, value, match):
    with pytest.raises(ValueError, match=f"MuScleConfig.{match}"):
        MuScleConfig(**{field: value})


def test_numpy_scalars_become_python_numbers():
    cfg = MuScleConfig(lora_r=np.int64(4), lora_alpha=np.float32(8), lora_dropout=np.float64(0.1))
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8.0, 0.1)
    assert type(cfg.lora_r) is int and type(cfg.lora_alpha) is float
    json.dumps(cfg.to_dict())  # JSON-ready as saved with an adapter


def test_bad_value_in_a_saved_config_names_the_file(tmp_path):
    model = tiny_model("bert", num_labels=2)
    patch_model(model)
    save_adapter(model, tmp_path)
    path = tmp_path / "muscle_config.json"
    meta = json.loads(path.read_text())
    meta["muscle_config"]["lora_r"] = "8"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"muscle_config\.json: MuScleConfig\.lora_r must be"):
        read_adapter_config(tmp_path)


@pytest.mark.parametrize("num_labels", [0, 1, -2, 2.0, True])
def test_classifier_needs_two_classes(num_labels):
    with pytest.raises(ConfigError, match="num_labels must be an integer >= 2"):
        load_classifier("any/model", num_labels)


def test_numpy_scalars_set_after_construction_are_saved_as_numbers(tmp_path):
    model = tiny_model("bert", num_labels=2)
    cfg = MuScleConfig.for_model(model)
    cfg.lora_alpha, cfg.mslr_scales = np.float32(16), [np.float32(2), np.float64(4)]
    patch_model(model, cfg)
    save_adapter(model, tmp_path)
    saved = read_adapter_config(tmp_path)
    assert saved.lora_alpha == 16.0 and saved.mslr_scales == [2.0, 4.0]


def test_adapter_listing_a_head_the_model_lacks_still_loads(tmp_path):
    """Adapters saved on a model without a task head, before patch_model refused head names that
    match nothing, list the family's head anyway."""
    from tiny_models import tiny_config
    from transformers import AutoModel

    def bare():
        torch.manual_seed(0)
        return AutoModel.from_config(tiny_config("bert", 2)).eval()

    model = patch_model(bare(), head_modules=[])
    for m in model.modules():
        if isinstance(m, MuScleLinear):
            nn.init.normal_(m.lora_B)
    save_adapter(model, tmp_path)
    path = tmp_path / "muscle_config.json"
    meta = json.loads(path.read_text())
    meta["muscle_config"]["head_modules"] = ["classifier"]
    path.write_text(json.dumps(meta))
    loaded = load_adapter(bare(), tmp_path)
    assert loaded.muscle_config.head_modules == []
    ids = torch.randint(3, 50, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        )
