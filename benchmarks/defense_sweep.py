"""A hyperparameter sweep of `muscle-fast defend`, many runs side by side, chosen on dev data only.

Small models leave a GPU idle between kernel launches, so several `defend` processes share one
GPU (or several CPU cores) at a time. Stage 1 runs every grid entry on one attack; stage 2 runs
the best `top` stage-1 settings, judged by the dev criterion alone (dev-poison ASR at most
`max_dev_asr`, then the highest dev-clean CACC), plus the baselines, on the other attacks. Test
numbers are recorded for the report but never read by the selection.

    python benchmarks/defense_sweep.py --grid benchmarks/sweeps/minilm-sst2.json \\
        --data-dir ../shared/data/poison_data/sst-2/1 --out out/sweep --parallel 8 --deadline 1800
    python benchmarks/defense_sweep.py collect --sweep out/sweep/sweep.json --out DIR \\
        --pick vanilla=vanilla-lr2e-5-e2 lora=lora-lr3e-4-e3 muscle=always-ref600-bs16-e3

`sweep.json` (atomic, rewritten after every finished run) holds each run's preset and records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muscle_fast.fileio import write_json  # noqa: E402


@dataclass
class Job:
    name: str
    attack: str
    method: str
    preset: dict[str, Any]
    stage: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    status: str = "queued"
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.name}--{self.attack}"


def dev_rank(rec: dict[str, Any], max_dev_asr: float) -> tuple:
    """Sort key (smaller is better): feasible runs by dev CACC, then the rest by dev ASR."""
    feasible = rec["dev_asr"] <= max_dev_asr
    return (0, -rec["dev_cacc"]) if feasible else (1, rec["dev_asr"])


def select_top(jobs: list[Job], k: int, max_dev_asr: float) -> list[Job]:
    """The k best finished stage-1 MuScleLoRA runs by the dev criterion (baselines, ablations excluded)."""
    done = [j for j in jobs if j.stage == 1 and j.status == "ok" and j.method == "muscle"]
    return sorted(done, key=lambda j: dev_rank(j.records[0], max_dev_asr))[:k]


def _command(args: argparse.Namespace, job: Job, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "muscle_fast.cli", "defend", "--data-dir", args.data_dir]
    cmd += ["--attacks", job.attack, "--methods", job.method, "--config", str(out / "preset.json")]
    cmd += ["--out", str(out), "--no-progress", "--device", args.device]
    return cmd + (["--model", args.model] if args.model else []) + args.defend_args.split()


def _start(args: argparse.Namespace, job: Job, root: Path) -> None:
    out = root / "runs" / job.key
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "preset.json", job.preset)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    with open(out / "log.txt", "w") as log:  # the child keeps its own copy of the descriptor
        job.proc = subprocess.Popen(_command(args, job, out), stdout=log, stderr=subprocess.STDOUT, env=env)
    job.started, job.status = time.time(), "running"


def _finish(job: Job, root: Path, rc: int) -> None:
    job.seconds = time.time() - job.started
    res = root / "runs" / job.key / "results.json"
    if rc == 0 and res.is_file():
        job.records = json.loads(res.read_text())
        job.status = "ok"
    else:
        log = (root / "runs" / job.key / "log.txt").read_text().strip().splitlines()
        job.status = f"failed rc={rc}: {log[-1] if log else ''}"


def _summary(jobs: list[Job]) -> list[dict[str, Any]]:
    out = []
    for j in jobs:
        row: dict[str, Any] = {"name": j.name, "attack": j.attack, "method": j.method, "stage": j.stage}
        row.update(status=j.status, seconds=round(j.seconds, 1), preset=j.preset)
        if j.records:
            r = j.records[0]
            row.update({k: r[k] for k in ("dev_cacc", "dev_asr", "cacc", "asr", "best_epoch", "epochs")})
            row.update(curves=r["curves"], wall_seconds=r["wall_seconds"], dataset=r["dataset"])
            row["config"] = r.get("config")
            # TrainConfig.teacher_epochs / scan_alpha: what the teacher and the n-gram scan dropped
            row.update({k: r[k] for k in ("teacher", "scan") if k in r})
        out.append(row)
    return out


def _print(rows: list[dict[str, Any]]) -> None:
    print(f"{'name':34s} {'attack':9s} st {'devCACC':>7s} {'devASR':>7s} {'CACC':>6s} {'ASR':>6s} {'s':>6s}")
    for r in rows:
        if "dev_cacc" in r:
            print(
                f"{r['name']:34s} {r['attack']:9s} {r['stage']:2d} {r['dev_cacc']:7.3f} {r['dev_asr']:7.3f} "
                f"{r['cacc']:6.3f} {r['asr']:6.3f} {r['seconds']:6.0f}"
            )
        else:
            print(f"{r['name']:34s} {r['attack']:9s} {r['stage']:2d} {r['status']}")


def _print_records(records: list[dict[str, Any]]) -> None:
    from muscle_fast.report import results_table

    print(results_table(records))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    grid = json.loads(Path(args.grid).read_text())
    base = grid.get("base", {})
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    s1 = grid["stage1"]
    jobs = [
        Job(r["name"], a, r.get("method", "muscle"), {**base, **r.get("preset", {})}, 1)
        for r in s1["runs"]
        for a in r.get("attacks", [s1["attack"]])  # a run may name its own attacks
    ]
    s2 = grid.get("stage2", {})
    for b in s2.get("baselines", []):
        for a in s2.get("attacks", []):
            jobs.append(Job(b["name"], a, b["method"], {**base, **b.get("preset", {})}, 2))
    stage2_added = not s2
    queue = list(jobs)
    while True:
        now = time.time() - t0
        for j in jobs:
            if j.status == "running" and j.proc is not None:
                rc = j.proc.poll()
                if rc is not None:
                    _finish(j, root, rc)
                    write_json(root / "sweep.json", _summary(jobs))
                elif now > args.deadline:
                    j.proc.kill()
                    j.proc.wait()
                    j.status, j.seconds = "killed at the deadline", time.time() - j.started
        stage1_open = any(j.stage == 1 and j.status in ("queued", "running") for j in jobs)
        if not stage2_added and not stage1_open:
            chosen = [
                Job(top.name, a, top.method, top.preset, 2)
                for top in select_top(jobs, s2.get("top", 2), s2.get("max_dev_asr", 0.1))
                for a in s2.get("attacks", [])
            ]
            jobs += chosen
            queue[:0] = chosen  # best first, and before the remaining baselines
            stage2_added = True
        running = sum(j.status == "running" for j in jobs)
        while queue and running < args.parallel and now < args.deadline - args.min_left:
            # stage-1 work first; stage-2 baselines fill free slots meanwhile
            _start(args, queue.pop(0), root)
            running += 1
        if not queue and running == 0 and stage2_added:
            break
        if running == 0 and now >= args.deadline - args.min_left:
            break  # nothing running and nothing may start any more
        time.sleep(1.0)
    for j in queue:
        j.status = "not started (deadline)"
    rows = _summary(jobs)
    write_json(root / "sweep.json", rows)
    return rows


def collect(
    sweeps: list[str], picks: dict[str, str], out: Path, model: str, note: str
) -> list[dict[str, Any]]:
    """results.json/md/png of one chosen run name per method, from one or more sweep.json files."""
    from muscle_fast.report import write_results

    rows = [r for f in sweeps for r in json.loads(Path(f).read_text()) if "dev_cacc" in r]
    records = []
    for method, name in picks.items():
        found: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r["name"] == name and r["method"] == method:
                if r["attack"] in found:
                    raise SystemExit(
                        f"defense_sweep: {name} / {method} / {r['attack']} is in two sweep files"
                    )
                found[r["attack"]] = r
        if not found:
            raise SystemExit(f"defense_sweep: no finished run {name!r} with method {method!r}")
        for _, r in sorted(found.items()):
            rec = {k: r[k] for k in ("attack", "method", "cacc", "asr", "dev_cacc", "dev_asr", "best_epoch")}
            rec.update(dataset=r.get("dataset", "sst-2"), epochs=r["epochs"], curves=r["curves"])
            rec.update(wall_seconds=r["wall_seconds"], adapter=None)
            rec["config"] = r.get("config") or {"method": method, "preset": r["preset"], "sweep_run": name}
            rec["config"]["note"] = note
            records.append(rec)
    order = {m: i for i, m in enumerate(picks)}
    records.sort(key=lambda r: (r["attack"], order[r["method"]]))
    write_results(out, records, model)
    return records


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["collect"]:
        c = argparse.ArgumentParser(description=collect.__doc__)
        c.add_argument("--sweep", nargs="+", required=True, help="sweep.json files")
        c.add_argument("--pick", nargs="+", required=True, help="METHOD=RUN_NAME, in table order")
        c.add_argument("--out", required=True)
        c.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
        c.add_argument("--note", default="", help="recorded in every record's config")
        a = c.parse_args(argv[1:])
        picks = dict(p.split("=", 1) for p in a.pick)
        _print_records(collect(a.sweep, picks, Path(a.out), a.model, a.note))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="JSON: base preset, stage1 {attack, runs}, stage2")
    p.add_argument("--data-dir", required=True, help="folder of OpenBackdoor attack folders")
    p.add_argument("--model", help="path or hub id (default: the demo MiniLM)")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--deadline", type=float, default=3600.0, help="seconds; no run survives it")
    p.add_argument("--min-left", type=float, default=60.0, help="no run starts with fewer seconds left")
    p.add_argument("--defend-args", default="", help="extra defend flags, e.g. '--max-train-rows 200'")
    args = p.parse_args(argv)
    _print(run(args))


if __name__ == "__main__":
    main()
