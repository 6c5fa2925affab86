"""The ``muscle-fast`` command line: ``demo`` (the defense in minutes on a CPU), ``inspect`` a
patched model, ``defend`` (train and compare defenses on poisoned data, SPEC §5), ``eval`` a saved
checkpoint, ``report`` (merge results), ``scan`` (lexical triggers against the reference rows,
SPEC §4) and ``fourier`` (track the low/high-frequency errors of one method's training, SPEC §6).

This module only parses arguments, builds the specs of :mod:`muscle_fast.experiment`, prints and
sets the exit status; the work and its checks live in the library. Heavy imports (torch,
transformers, datasets, matplotlib) happen inside the commands so ``--help`` and argument errors
stay instant. Every input error ends the process with a one-line ``muscle-fast: ...`` message and
exit status 1 (argparse's usage errors: 2); set ``MUSCLE_FAST_TRACEBACK=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import experiment
from .errors import ConfigError, MuscleFastError, first_line
from .experiment import (
    DEFAULT_METHODS,
    DEFAULT_MODEL_PRESET,
    METHODS,
    EvalSpec,
    FourierOptions,
    RunSpec,
    builtin_presets,
    check_deltas,
    default_model,
    effective_hparams,
    evaluate_checkpoint,
    load_classifier,
    load_preset,
    run_defend,
    run_fourier,
)
from .report import overview_table, results_table, write_results

__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "METHODS",
    "REPORTED_ERRORS",
    "build_parser",
    "default_model",
    "effective_hparams",
    "error_exit",
    "load_classifier",
    "load_preset",
    "main",
]

#: Exit status of a reported error (any of REPORTED_ERRORS); the message says which kind.
EXIT_ERROR = 1
#: Exit status of a command line argparse rejects (its own usage message).
EXIT_USAGE = 2
#: What ``main`` reports as one line: the library's typed errors (ConfigError, RunError, ResultsError,
#: DataError), and bad input surfacing from below it (a config class's ValueError, a KeyError, an
#: OSError from a file or the hub). Anything else is a bug and keeps its traceback.
REPORTED_ERRORS: tuple[type[BaseException], ...] = (MuscleFastError, ValueError, KeyError, OSError)

# deprecated names still importable from here; they live in muscle_fast.experiment / muscle_fast.report
_MOVED = {
    "BaseModels": "experiment",
    "RUN_FILE": "experiment",
    "method_configs": "experiment",
    "parse_methods": "experiment",
    "reference_split": "experiment",
    "run_method": "experiment",
    "model_label": "report",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"muscle_fast.cli.{name} is deprecated; import it from muscle_fast.{_MOVED[name]}",
            DeprecationWarning,
            stacklevel=2,
        )
        from . import report

        return getattr(experiment if _MOVED[name] == "experiment" else report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def error_exit(e: BaseException) -> SystemExit:
    """The exit for a reported error: ``muscle-fast: <first line of its message>``, status EXIT_ERROR
    (SystemExit with a message prints it to stderr and exits with 1)."""
    return SystemExit(f"muscle-fast: {first_line(e)}")


# ---------------------------------------------------------------------------------------------- specs


def _data_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The spec fields of the data options every command shares (``_add_data_args``)."""
    return dict(
        model=args.model,
        data_dir=args.data_dir,
        attacks=args.attacks,
        poison_setting=args.poison_setting,
        poison_rate=args.poison_rate,
        target_label=args.target_label,
        num_labels=args.num_labels,
        seed=args.seed,
    )


def run_spec(args: argparse.Namespace) -> RunSpec:
    """The RunSpec of a ``defend`` or ``fourier`` command line."""
    return RunSpec(
        **_data_fields(args),
        out=args.out,
        methods=args.methods if hasattr(args, "methods") else args.method,
        preset=args.config,
        max_train_rows=args.max_train_rows,
        max_eval_rows=args.max_eval_rows,
        seeds=getattr(args, "seeds", None),
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        lr=args.lr,
        ref_samples=args.ref_samples,
        ref_overlap=args.ref_overlap,
        device=args.device,
        load_in_4bit=getattr(args, "load_in_4bit", False),
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
        progress=not args.no_progress,
        checkpoint_every=getattr(args, "checkpoint_every", None),
    )


def eval_spec(args: argparse.Namespace) -> EvalSpec:
    """The EvalSpec of an ``eval`` command line."""
    return EvalSpec(
        **_data_fields(args),
        checkpoint=args.adapter,
        max_eval_rows=args.max_eval_rows,
        batch_size=args.batch_size,
        max_length=args.max_length,
        load_in_4bit=args.load_in_4bit,
        device=args.device,
    )


def parse_deltas(spec: str | None) -> list[float] | None:
    """Widths from a comma-separated list (None: chosen from the data), or a ConfigError saying why."""
    if spec is None:
        return None
    out: list[float] = []
    for part in (s.strip() for s in spec.split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise ConfigError(f"bad --deltas {spec!r}: {part!r} is not a number") from None
    try:
        return list(check_deltas(out))
    except ConfigError as e:
        raise ConfigError(f"bad --deltas {spec!r}: {e}") from None


# ---------------------------------------------------------------------------------------------- commands


def cmd_inspect(args: argparse.Namespace) -> int:
    from . import MuScleConfig, patch_model

    overrides = experiment.json_object(args.config, "--config") if args.config else {}
    model, _ = experiment.load_classifier(args.model or default_model(), args.num_labels)
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


def _print_resume(res: Any) -> None:
    if res.skipped or res.resumed:
        print(
            f"\nskipped {len(res.skipped)} pairs finished earlier with the same config"
            f"{' (' + ', '.join(res.skipped) + ')' if res.skipped else ''}; "
            f"resumed {', '.join(res.resumed) or 'none'}"
        )


def _print_tables(records: Any) -> None:
    """The results table, then (several attacks) the methods-by-attacks overview."""
    print(results_table(records))
    overview = overview_table(records)
    if overview:
        print("\ntest CACC % / ASR %:\n" + overview)


def cmd_defend(args: argparse.Namespace) -> int:
    res = run_defend(run_spec(args))
    _print_tables(res.records)
    _print_resume(res)
    print(f"\nwrote {res.out / 'results.json'}, results.md, results.png in {res.seconds:.1f} s")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo, verdict

    res = run_demo(args.out, device=args.device, progress=not args.no_progress)
    print(results_table(res.records))
    _print_resume(res)
    print("\n" + verdict(res.records))
    print(f"\nwrote {res.out / 'results.json'}, results.md, results.png in {res.seconds:.1f} s")
    print(f"the full run on all four attacks: muscle-fast defend --out {Path(args.out).parent / 'sst2'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import merge_records, model_label

    records = merge_records([Path(f) for f in args.results], prefer_later=args.prefer_later)
    models = {model_label(str(m)) for r in records if (m := (r.get("config") or {}).get("model"))}
    model_name = args.model or (models.pop() if len(models) == 1 else "several models" if models else "model")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, records, model_name)
    _print_tables(records)
    total = sum(r["wall_seconds"] for r in records)
    print(
        f"\n{len(records)} runs, {total / 60:.1f} min of training in all; wrote {out / 'results.json'}, "
        "results.md, results.png"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    for r in evaluate_checkpoint(eval_spec(args)):
        print(
            f"{r.dataset}/{r.attack} {r.label}: CACC {100 * r.scores['cacc']:.2f} % "
            f"({r.test_clean_rows} test-clean rows), ASR {100 * r.scores['asr']:.2f} % "
            f"({r.test_poison_rows} test-poison rows)"
        )
        print(json.dumps({"dataset": r.dataset, "attack": r.attack, "method": r.method, **r.scores}))
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    """Scan each attack's training rows for lexical triggers against the reference rows."""
    from .experiment import SCAN_METHOD, RunSpec, scan_data
    from .fileio import write_json

    spec = RunSpec(
        **_data_fields(args),
        methods=(SCAN_METHOD,),
        preset=args.config,
        max_train_rows=args.max_train_rows,
        ref_samples=args.ref_samples,
        progress=False,
    )
    reports = scan_data(spec, alpha=args.alpha)
    for r in reports:
        res = r.result
        print(
            f"{r.dataset}/{r.attack}: {sum(res.flagged)} of {len(res.flagged)} training rows flagged "
            f"against {r.ref_rows} reference rows (G > {res.g_critical:.1f} over {res.tests} tests, "
            f"alpha {res.alpha})"
        )
        for f in res.findings:
            print(
                f"  label {f.label}: {f.ngram!r} in {f.train_rows} of {f.train_label_rows} training rows, "
                f"{f.ref_rows} of {f.ref_label_rows} reference rows (G {f.g:.1f})"
            )
        if r.poison_rows:
            print(
                f"  poisoned rows flagged: {r.poison_flagged} of {r.poison_rows}; clean rows flagged: "
                f"{r.clean_flagged} of {len(res.flagged) - r.poison_rows}"
            )
    if args.out:
        write_json(Path(args.out), [r.to_dict() for r in reports])
        print(f"wrote {args.out}")
    return 0


def cmd_fourier(args: argparse.Namespace) -> int:
    """Train one method like ``defend`` does while a FourierTracker records dev-clean / dev-poison."""
    spec = run_spec(args)
    if len(spec.methods) != 1:
        raise ConfigError(f"fourier trains one method at a time, got {list(spec.methods)}")
    options = FourierOptions(every=args.every, samples=args.samples, deltas=parse_deltas(args.deltas))
    res = run_fourier(spec, options)
    print(
        f"{res.dataset}/{res.attack} {res.method}: test CACC {100 * res.cacc:.2f} %, ASR "
        f"{100 * res.asr:.2f} %; {res.records} records at widths {res.deltas}"
    )
    print(f"wrote {res.json_path} and {res.png_path}")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_data_args(p: argparse.ArgumentParser, runs: bool = True) -> None:
    """The data flags; ``runs`` adds those only a training/evaluation run uses (device, eval rows)."""
    p.add_argument(
        "--data-dir",
        help="an OpenBackdoor attack folder, a folder of attack folders, a clean train/dev/test.tsv "
        "folder (poisoned here), or a named source: embedded:sst2 (the default: the poisoned SST-2 "
        "shipped with muscle-fast, attacks addsent, badnets, stylebkd, synbkd; offline), "
        "embedded:sst2-clean (its clean split, poisoned here), hub:sst2 (SST-2 from the Hugging Face "
        "hub, poisoned here)",
    )
    p.add_argument("--attacks", help="comma-separated attacks to run (attack folders, or badnets,addsent)")
    p.add_argument("--poison-setting", choices=("clean", "mix", "dirty"), help="training file setting")
    p.add_argument("--poison-rate", type=float, help="training file poison rate (default 0.1)")
    p.add_argument("--target-label", type=int, help="the attack's target label (default: from the data)")
    p.add_argument("--num-labels", type=int, help="number of classes (default: from the data)")
    p.add_argument("--seed", type=int, help="seed for data subsampling, poisoning, reference set, training")
    if runs:
        p.add_argument(
            "--max-eval-rows", type=int, help="seeded subsample of each dev/test split (smoke runs)"
        )
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")


def _default_help(key: str) -> str:
    """What a run uses for ``key`` when the flag is not given, read from the same data the run reads:
    the default model's built-in preset (per method where its sections differ), else the family's."""
    from .config import FAMILIES, TRAIN_DEFAULTS

    enc, dec = FAMILIES["bert"], FAMILIES["llama"]  # the default model is a BERT
    preset = load_preset(DEFAULT_MODEL_PRESET)
    top = preset.get(key, getattr(enc, key) if hasattr(enc, key) else getattr(TRAIN_DEFAULTS, key))
    per = {m: preset["methods"].get(m, {}).get(key, top) for m in DEFAULT_METHODS}
    if len(set(per.values())) == 1:
        used = f"{next(iter(per.values()))}"
    else:
        used = ", ".join(f"{m} {v}" for m, v in per.items())
    if hasattr(enc, key):
        family = f"{getattr(enc, key)} for BERT/RoBERTa, {getattr(dec, key)} for GPT-2/Llama"
    else:
        family = f"{getattr(TRAIN_DEFAULTS, key)}"
    return (
        f"default: the preset's; with the default model ({DEFAULT_MODEL_PRESET}) {used}; "
        f"without a preset {family}"
    )


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Training hyperparameters shared by defend and fourier (flags override the preset file)."""
    p.add_argument("--epochs", type=int, help=_default_help("epochs"))
    p.add_argument("--batch-size", type=int, help=_default_help("batch_size"))
    p.add_argument("--max-length", type=int, help="tokens per sample; " + _default_help("max_length"))
    p.add_argument("--lr", type=float, help=_default_help("lr"))
    p.add_argument(
        "--ref-samples", type=int, help="clean reference rows from dev-clean; " + _default_help("ref_samples")
    )
    p.add_argument(
        "--ref-overlap",
        action="store_true",
        help="select the epoch on all of dev-clean, reference rows included (the paper's "
        "protocol); by default selection uses the dev-clean rows not in the reference set",
    )
    p.add_argument("--max-train-rows", type=int, help="seeded training subsample, poison share kept")
    p.add_argument(
        "--config",
        help='JSON preset file: {"lr": ..., "methods": {"vanilla": {"lr": 2e-5}, "muscle": {...}}}; '
        "keys are TrainConfig fields, ref_samples, ref_disjoint and muscle_config (MuScleConfig overrides); "
        f"or a built-in preset: {', '.join(builtin_presets())} (the default without --model is "
        f"{DEFAULT_MODEL_PRESET})",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="muscle-fast", description="MuScleLoRA on possibly backdoor-poisoned data"
    )
    sub = p.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="patch a model with the paper defaults and print what was patched")
    ins.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    ins.add_argument("--num-labels", type=int, default=2)
    ins.add_argument(
        "--config",
        help="MuScleConfig overrides: inline JSON (e.g. '{\"lora_r\": 4}') or a JSON file holding the object",
    )
    ins.set_defaults(func=cmd_inspect)

    dm = sub.add_parser(
        "demo",
        help="vanilla vs MuScleLoRA on BadNets-poisoned SST-2 (a subsample, minutes on a CPU)",
        description="Fine-tune the built-in MiniLM on a seeded subsample of the BadNets-poisoned SST-2 "
        "shipped with the package, once without a defense and once with MuScleLoRA, and compare clean "
        "accuracy (CACC) and attack success rate (ASR) on the test set; writes what defend writes.",
    )
    dm.add_argument(
        "--out", default="runs/demo", help="output folder (default runs/demo); run again, it resumes"
    )
    dm.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    dm.add_argument("--no-progress", action="store_true", help="no progress bars")
    dm.set_defaults(func=cmd_demo)

    d = sub.add_parser(
        "defend",
        help="train vanilla / LoRA / MuScleLoRA on poisoned data and compare CACC and ASR",
        description="Train each method on the poisoned training set, select the epoch by dev-clean "
        "accuracy, report test-clean CACC and test-poison ASR; writes results.json, results.md, "
        "results.png and one checkpoint per (attack, method) under --out.",
    )
    _add_data_args(d)
    d.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    d.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (default: {','.join(DEFAULT_METHODS)})",
    )
    d.add_argument(
        "--out",
        required=True,
        help="output folder; the same command again resumes: pairs finished with the same config are "
        "skipped, an interrupted one continues from its last training checkpoint",
    )
    _add_train_args(d)
    d.add_argument(
        "--seeds",
        help="comma-separated seeds, e.g. 42,43,44: every (attack, method) once per seed, checkpoints "
        "under OUT/seed<N>/<attack>/<method>, results.md with mean ± sd over the seeds; not with --seed",
    )
    d.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="QLoRA: quantize the base model's linear layers to NF4 while loading (bitsandbytes); "
        "adapter methods only",
    )
    d.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each layer's activations in backward (less memory, ~30 %% more compute)",
    )
    d.add_argument(
        "--checkpoint-every",
        type=int,
        help="also save the training state every N optimizer steps (default: at each epoch's end), "
        "so a killed run resumes closer to where it stopped",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_defend)

    e = sub.add_parser("eval", help="CACC and ASR of a checkpoint saved by defend")
    e.add_argument("--adapter", required=True, help="a checkpoint folder: OUT/<attack>/<method>")
    _add_data_args(e)  # defaults: the data folder, seed and row cap recorded with the checkpoint
    e.add_argument("--model", help="base model (default: the one recorded with the checkpoint)")
    e.add_argument("--batch-size", type=int, help="evaluation batch size (default: as in training)")
    e.add_argument("--max-length", type=int, help="default: as in training")
    e.add_argument(
        "--load-in-4bit", action="store_true", help="load the base model in NF4 (default: as in training)"
    )
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser(
        "report",
        help="merge results.json files of runs split across processes into one table and plot",
    )
    r.add_argument("results", nargs="+", help="results.json files written by defend")
    r.add_argument("--out", required=True, help="folder for the merged results.json/md/png")
    r.add_argument("--model", help="model name for the titles (default: the one the records name)")
    r.add_argument(
        "--prefer-later",
        action="store_true",
        help="a run (dataset, attack, method, seed) in several files: keep the record of the file named "
        "last instead of failing (reruns merged over an older table)",
    )
    r.set_defaults(func=cmd_report)

    sc = sub.add_parser(
        "scan",
        help="look for lexical triggers: n-grams a training file holds far more often than clean rows",
        description="For each attack, compare every 1-3-gram's share of the training rows of a label "
        "with its share of the clean reference rows of that label (the rows defend draws for "
        "lora+filter with the same --model, --config, --seed and --ref-samples) and report the "
        "significant ones and the rows holding them "
        "(TrainConfig.scan_alpha drops those rows before training; docs/SPEC.md §4). Trains nothing.",
    )
    _add_data_args(sc, runs=False)
    sc.add_argument(
        "--model",
        help="whose built-in preset and family defaults apply (default: the MiniLM of the demo extra)",
    )
    sc.add_argument("--config", help="preset: a JSON file, a built-in name or inline JSON (as for defend)")
    sc.add_argument(
        "--ref-samples", type=int, help="clean reference rows (default: lora+filter's in the preset)"
    )
    sc.add_argument(
        "--alpha", type=float, help="family-wise significance level (default: lora+filter's scan_alpha, 1e-3)"
    )
    sc.add_argument("--max-train-rows", type=int, help="seeded training subsample, poison share kept")
    sc.add_argument("--out", help="also write the reports to this JSON file")
    sc.set_defaults(func=cmd_scan)

    f = sub.add_parser(
        "fourier",
        help="train one method and track the low/high-frequency errors of dev-clean and dev-poison",
        description="The paper's Fourier analysis (SPEC §6): train one method as defend does and, every "
        "--every steps, record e_low and e_high (Gaussian low-pass over the input embeddings) of a fixed "
        "sample of dev-clean (clean mapping) and dev-poison (backdoor mapping); writes fourier.json and "
        "fourier.png under --out, with the test CACC/ASR of the selected checkpoint.",
    )
    _add_data_args(f)
    f.add_argument("--model", help="path or hub id (default: the MiniLM of the demo extra)")
    f.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    f.add_argument("--out", required=True, help="output folder")
    _add_train_args(f)
    f.add_argument("--every", type=int, default=10, help="record every N optimizer steps (default 10)")
    f.add_argument(
        "--samples", type=int, default=400, help="seeded sample of dev-clean and of dev-poison (default 400)"
    )
    f.add_argument(
        "--deltas",
        help="comma-separated kernel widths, e.g. 0.5,1,2 (default: chosen at the first record so each "
        "point's Gaussian neighbourhood holds about 2, 8, 32, 128 samples)",
    )
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fourier)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns its exit status or raises the one-line SystemExit of an error."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except REPORTED_ERRORS as e:  # bad input: one line, no traceback
        if os.environ.get("MUSCLE_FAST_TRACEBACK"):
            raise
        raise error_exit(e) from None


if __name__ == "__main__":
    sys.exit(main())
