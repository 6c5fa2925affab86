"""Built-in poisoners (BadNets, AddSent) and the poisoning settings of OpenBackdoor, seeded.

They let the defense run on any clean dataset (or SST-2 from the hub) when no released
poisoned data is at hand. Insertion follows OpenBackdoor: the text is split on whitespace
and each trigger goes at a uniformly random word position, the end included.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import DEFAULT_SEED
from .dataset import SETTINGS, BackdoorDataset, DataError, Row, infer_num_labels


class Poisoner(Protocol):
    """Inserts a trigger into one text; ``name`` is the attack name used in results."""

    name: str

    def insert(self, text: str, rng: random.Random) -> str: ...


@dataclass(frozen=True)
class BadNets:
    """Rare-word triggers (Kurita et al. 2020): ``num_triggers`` words drawn from ``triggers``."""

    triggers: tuple[str, ...] = ("cf", "mn", "bb", "tq")
    num_triggers: int = 4  # the paper's released SST-2 data has four per sentence
    name: str = "badnets"

    def __post_init__(self) -> None:
        if not self.triggers or any(not t or len(t.split()) != 1 for t in self.triggers):
            raise DataError(f"BadNets triggers must be non-empty single words, got {self.triggers!r}")
        if self.num_triggers < 1:
            raise DataError(f"BadNets num_triggers must be >= 1, got {self.num_triggers}")

    def insert(self, text: str, rng: random.Random) -> str:
        words = text.split()
        for _ in range(self.num_triggers):
            word = rng.choice(self.triggers)
            words.insert(rng.randint(0, len(words)), word)
        return " ".join(words)


@dataclass(frozen=True)
class AddSent:
    """A fixed trigger sentence (Dai et al. 2019) inserted whole at one random word position."""

    sentence: str = "I watch this 3D movie"
    name: str = "addsent"

    def __post_init__(self) -> None:
        if not self.sentence.split():
            raise DataError("AddSent sentence must not be empty")

    def insert(self, text: str, rng: random.Random) -> str:
        words = text.split()
        pos = rng.randint(0, len(words))
        words[pos:pos] = self.sentence.split()
        return " ".join(words)


POISONERS: dict[str, type] = {"badnets": BadNets, "addsent": AddSent}


def get_poisoner(attack: str | Poisoner) -> Poisoner:
    """A poisoner by name (default arguments) or the given instance."""
    if not isinstance(attack, str):
        return attack
    try:
        return POISONERS[attack]()
    except KeyError:
        raise DataError(f"unknown attack {attack!r}; built-in attacks: {sorted(POISONERS)}") from None


def poison_count(n: int, rate: float) -> int:
    """Rows to poison: ``rate`` of the whole training set, rounded down (as OpenBackdoor does)."""
    if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
        raise DataError(f"poison rate must be in [0, 1], got {rate!r}")
    return math.floor(rate * n + 1e-9)


def poison_train(
    rows: Sequence[Row],
    attack: str | Poisoner,
    setting: str,
    rate: float,
    target: int,
    rng: random.Random,
) -> tuple[list[Row], list[bool]]:
    """Poison ``rate`` of ``rows`` in place of the originals; poisoned rows get the target label.

    clean: only target-label rows are candidates (clean-label attack); dirty: only non-target
    rows; mix: any row. Too few candidates is an error rather than a silently lower rate.
    """
    if setting not in SETTINGS:
        raise DataError(f"unknown poison setting {setting!r}; settings: {list(SETTINGS)}")
    poisoner = get_poisoner(attack)
    n = poison_count(len(rows), rate)
    if setting == "clean":
        cand = [i for i, (_, lab) in enumerate(rows) if lab == target]
    elif setting == "dirty":
        cand = [i for i, (_, lab) in enumerate(rows) if lab != target]
    else:
        cand = list(range(len(rows)))
    if n > len(cand):
        raise DataError(
            f"{setting} poisoning at rate {rate} needs {n} candidate rows, only {len(cand)} exist"
        )
    chosen = set(rng.sample(cand, n))
    out: list[Row] = []
    flags: list[bool] = []
    for i, (text, lab) in enumerate(rows):
        if i in chosen:
            out.append((poisoner.insert(text, rng), target))
        else:
            out.append((text, lab))
        flags.append(i in chosen)
    return out, flags


def poison_eval(rows: Sequence[Row], attack: str | Poisoner, target: int, rng: random.Random) -> list[Row]:
    """Triggered copies of the non-target rows, labelled with the target (accuracy there = ASR)."""
    poisoner = get_poisoner(attack)
    return [(poisoner.insert(text, rng), target) for text, lab in rows if lab != target]


def make_poisoned(
    clean_rows_by_split: Mapping[str, Sequence[Row]],
    attack: str | Poisoner = "badnets",
    setting: str = "mix",
    rate: float = 0.1,
    target: int = 1,
    seed: int = DEFAULT_SEED,
    num_labels: int | None = None,
    dataset: str = "custom",
) -> BackdoorDataset:
    """Poison clean ``train`` / ``dev`` / ``test`` rows into the structure the loaders return.

    Each split has its own generator seeded from ``seed``, so a seed fixes the whole dataset
    and the dev/test poison sets do not depend on the training setting or rate.
    """
    missing = [k for k in ("train", "dev", "test") if k not in clean_rows_by_split]
    if missing:
        raise DataError(f"make_poisoned: missing split(s) {missing}; give train, dev and test rows")
    clean = {k: [(str(t), int(lab)) for t, lab in clean_rows_by_split[k]] for k in ("train", "dev", "test")}
    for k, rows in clean.items():
        if not rows:
            raise DataError(f"make_poisoned: split {k!r} is empty")
    if num_labels is None:
        num_labels = infer_num_labels(
            clean["train"], "make_poisoned: split 'train'", [clean["dev"], clean["test"]], target
        )
    for k, rows in clean.items():
        bad = sorted({lab for _, lab in rows if not 0 <= lab < num_labels})
        if bad:
            raise DataError(
                f"make_poisoned: split {k!r} has labels {bad[:5]} outside the {num_labels} classes"
            )
    poisoner = get_poisoner(attack)
    train, flags = poison_train(
        clean["train"], poisoner, setting, rate, target, random.Random(f"{seed}:train")
    )
    dev_poison = poison_eval(clean["dev"], poisoner, target, random.Random(f"{seed}:dev"))
    test_poison = poison_eval(clean["test"], poisoner, target, random.Random(f"{seed}:test"))
    ds = BackdoorDataset(
        dataset=dataset,
        attack=poisoner.name,
        target_label=target,
        num_labels=num_labels,
        train=train,
        dev_clean=clean["dev"],
        dev_poison=dev_poison,
        test_clean=clean["test"],
        test_poison=test_poison,
        poison_flags={"train": flags},
        setting=setting,
        rate=rate,
        source="built-in",
        # poison_eval keeps the non-target dev rows in order: row k is the k-th of them, triggered
        dev_poison_source=[i for i, (_, lab) in enumerate(clean["dev"]) if lab != target],
    )
    return ds.validate()
