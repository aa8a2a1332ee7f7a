"""A tiny, real DVC project for testing the flow: cheap Python stages, no data.

Shape (``prepare`` has a directory output that ``left`` depends on a file inside of)::

    prepare ──> left ──> train@small ──┐
       │                 train@large ──┼──> report   (reports/results.md, metrics.json)
       └──────> right ─────────────────┘
    lonely                                            (independent of all others)

Every stage command is ``python step.py NAME --in ... --out ...``: it appends
``NAME start <t>`` and ``NAME end <t>`` to ``run.log`` (not tracked by DVC) and writes
outputs whose content depends on its inputs, so a changed input changes what is
downstream of it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

__all__ = ["STAGES", "EDGES", "make_project", "read_run_log", "dvc_env"]

#: stage names, foreach items expanded
STAGES = ["prepare", "left", "right", "train@small", "train@large", "report", "lonely"]
#: (upstream, downstream) pairs
EDGES = [
    ("prepare", "left"),
    ("prepare", "right"),
    ("left", "train@small"),
    ("left", "train@large"),
    ("right", "report"),
    ("train@small", "report"),
    ("train@large", "report"),
]

STEP_PY = r'''
import argparse, hashlib, json, pathlib, sys, time

p = argparse.ArgumentParser()
p.add_argument("name")
p.add_argument("--in", dest="inputs", action="append", default=[])
p.add_argument("--out", dest="outputs", action="append", default=[])
p.add_argument("--metrics")
p.add_argument("--sleep", type=float, default=0.0)
p.add_argument("--flaky", help="counter file: fail on the first call, succeed after")
p.add_argument("--train-log", type=int, default=0, help="print N mmengine-like lines")
a = p.parse_args()

log = pathlib.Path("run.log")
with log.open("a") as f:
    f.write(f"{a.name} start {time.time():.6f}\n")
print(f"[{a.name}] starting", flush=True)
if a.flaky:
    counter = pathlib.Path(a.flaky)
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    if n == 1:
        print(f"[{a.name}] flaky failure on attempt {n}", flush=True)
        sys.exit(5)
for i in range(1, a.train_log + 1):
    print(f"2026/01/01 00:00:00 - mmengine - INFO - Iter(train) [{i}/{a.train_log}]  lr: 1.0e-02  eta: 0:00:0{a.train_log - i}", flush=True)
time.sleep(a.sleep)
digest = hashlib.sha256(a.name.encode())
for src in a.inputs:
    digest.update(pathlib.Path(src).read_bytes())
for dst in a.outputs:
    out = pathlib.Path(dst)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".md":
        out.write_text(f"# Results\n\n| stage | digest |\n|---|---|\n| {a.name} | {digest.hexdigest()[:12]} |\n")
    else:
        out.write_text(f"{a.name} {digest.hexdigest()}\n")
if a.metrics:
    pathlib.Path(a.metrics).write_text(json.dumps({"mAP": 0.5, "detail": {"mAP_50": 0.75}}))
print(f"[{a.name}] done", flush=True)
with log.open("a") as f:
    f.write(f"{a.name} end {time.time():.6f}\n")
'''


def _dvc_yaml(py: str, fail: str | None, flaky: str | None, sleep: dict[str, float] | None) -> str:
    sleep = sleep or {}

    def cmd(name: str, args: str) -> str:
        if name == fail:
            return "exit 3"
        extra = f" --flaky counter-{name}.txt" if name == flaky else ""
        if name == "train@${item}":
            extra += " --train-log 3"
            naps = {sleep.get("train@small"), sleep.get("train@large")} - {None}
            if naps:  # one command for both foreach items
                extra += f" --sleep {max(naps)}"
        elif name in sleep:
            extra += f" --sleep {sleep[name]}"
        return f"{py} step.py {name} {args}{extra}"

    return f"""\
stages:
  prepare:
    cmd: {cmd("prepare", "--in params.txt --out data/prepared/a.txt")}
    deps: [step.py, params.txt]
    outs: [data/prepared]
  left:
    cmd: {cmd("left", "--in data/prepared/a.txt --out data/left.txt")}
    deps: [step.py, data/prepared/a.txt]
    outs: [data/left.txt]
  right:
    cmd: {cmd("right", "--in data/prepared/a.txt --in right.txt --out data/right.txt")}
    deps: [step.py, data/prepared, right.txt]
    outs: [data/right.txt]
  train:
    foreach: [small, large]
    do:
      cmd: {cmd("train@${item}", "--in data/left.txt --out models/${item}.txt")}
      deps: [step.py, data/left.txt]
      outs:
        - models/${{item}}.txt
  report:
    cmd: {cmd("report", "--in data/right.txt --in models/small.txt --in models/large.txt --out reports/results.md --metrics metrics.json")}
    deps: [step.py, data/right.txt, models/small.txt, models/large.txt]
    outs: [reports/results.md]
    metrics:
      - metrics.json:
          cache: false
  lonely:
    cmd: {cmd("lonely", "--in lonely.txt --out data/lonely.txt")}
    deps: [step.py, lonely.txt]
    outs: [data/lonely.txt]
"""


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def make_project(
    path: str | os.PathLike,
    *,
    fail: str | None = None,
    flaky: str | None = None,
    sleep: dict[str, float] | None = None,
    python: str = sys.executable,
) -> Path:
    """Create the demo DVC project in ``path`` (git init, dvc init, analytics off).

    ``fail``: stage whose command is ``exit 3``; ``flaky``: stage failing on its first
    run only; ``sleep``: seconds some stages sleep.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    env = dvc_env()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run([python, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    subprocess.run(
        [python, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True, env=env
    )
    (root / "step.py").write_text(STEP_PY)
    (root / "params.txt").write_text("seed=1\n")
    (root / "right.txt").write_text("right input v1\n")
    (root / "lonely.txt").write_text("lonely input\n")
    (root / "dvc.yaml").write_text(_dvc_yaml(shlex.quote(python), fail, flaky, sleep))
    return root


def read_run_log(root: str | os.PathLike) -> list[tuple[str, str, float]]:
    """``(stage, "start"|"end", time)`` entries of ``run.log``, in file order."""
    log = Path(root) / "run.log"
    if not log.exists():
        return []
    entries = []
    for line in log.read_text().splitlines():
        name, what, when = line.rsplit(" ", 2)
        entries.append((name, what, float(when)))
    return entries
