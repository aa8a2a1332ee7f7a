"""The DVC side of a run: the stage graph, what changed, and ``dvc repro`` of one stage.

Every stage runs as ``dvc --wait-for-lock repro --single-item <stage>``, in the workspace or
on a Dask worker (:mod:`flows.engine`), several at once. DVC 3.67 releases its repository
lock while a stage's command runs, and ``--wait-for-lock`` waits for it around the
bookkeeping. Two things remain that concurrent DVC commands can hit:

* DVC's path locks (``.dvc/tmp/rwlock``) and the guard of that file fail at once, or after
  3 s, instead of waiting: a command that fails with one of those messages (:data:`BUSY`)
  is run again, up to :data:`LOCK_RETRIES` times;
* dvc.lock lists stages in the order they first completed: :func:`normalise_lock` puts them
  back in dvc.yaml's order once the run ends, so that its bytes do not depend on timing.

The graph, the changed stages and each stage's ``meta`` come from DVC's Python API in one
process (one ``dvc status`` of the whole pipeline), not from a DVC command per stage.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from dfmsd.core.io import WORK_ROOT, work_dir_label
from flows import guard, output

#: Lines of output kept for the message of a failed stage.
TAIL_LINES = 20
#: DVC's messages for a lock another DVC command holds (rwlock.py, lock.py), and SQLite's.
BUSY = re.compile(r'is busy, it is being blocked by|Unable to acquire lock|database is locked')
LOCK_RETRIES = 8
#: What ``dvc repro`` prints for a stage it restores from its run-cache, or finds unchanged
#: (a stage downstream of one that ran, whose inputs came out the same).
SAID = {
    'restored': "Stage '{stage}' is cached - skipping run, checking out outputs",
    'skipped': "Stage '{stage}' didn't change, skipping",
}
#: What ``dvc repro`` prints before a stage's command: a lock error after it is not retried.
STARTED = "Running stage '"


def params_check(repo: Path, preset: str | None) -> list[str] | None:
    """The command of ``python -m dfmsd.check`` (``make check``) for params.yaml or the preset:
    the schema, the teachers and the dataset, before DVC touches any output. None for a DVC
    project of another shape (no dfmsd/check.py: nothing to check)."""
    if not (Path(repo) / 'dfmsd' / 'check.py').is_file():
        return None
    return [sys.executable, '-m', 'dfmsd.check', *(['--preset', preset] if preset else [])]


class PipelineError(RuntimeError):
    """A DVC command of the flow itself (not a stage's) failed, or a target is unknown."""


@dataclass
class StageResult:
    stage: str
    outcome: str  # ran | restored | skipped | failed | not run | cancelled
    seconds: float = 0.0
    message: str = ''
    output: list[str] = field(default_factory=list, repr=False)  # Prefect logs a failed state's repr
    exit_code: int | None = None
    where: str = ''  #: the Dask worker that ran it, if one did

    @property
    def ok(self) -> bool:
        return self.outcome in ('ran', 'restored', 'skipped')


#: What a Dask nanny sets for its worker (``distributed.nanny.pre-spawn-environ``) and a stage
#: command must not inherit: glibc then hands freed memory back at 64 KiB and faults it in again.
#: A 40-iteration `distill_me` training: 5.0 M minor faults and 10.2 s system time with it, 0.27 M
#: and 1.2 s without, similar user time, the same log and model bytes (benchmarks/stage_env.sh).
WORKER_ONLY_ENV = 'MALLOC_TRIM_THRESHOLD_'


def subprocess_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment of DVC and stage commands in ``root``: this interpreter's bin first on
    PATH, and ``root`` first on PYTHONPATH, so that a worktree runs its own copy of the
    package (not the one installed in editable mode from another checkout); without the
    Dask worker's :data:`WORKER_ONLY_ENV` (a value the user set otherwise is kept)."""
    env = dict(os.environ, DVC_NO_ANALYTICS='1', **extra)
    if env.get(WORKER_ONLY_ENV) == str(_nanny_env().get(WORKER_ONLY_ENV)):
        del env[WORKER_ONLY_ENV]
    env['PATH'] = str(Path(sys.executable).parent) + os.pathsep + env.get('PATH', '')
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(root), env.get('PYTHONPATH')]))
    return env


def _nanny_env() -> dict:
    import dask

    return dask.config.get('distributed.nanny.pre-spawn-environ', default={}) or {}


def stream(
    cmd: list[str],
    cwd: Path,
    on_line: Callable[[str], None] | None = None,
    *,
    env: dict | None = None,
    start: Callable[..., subprocess.Popen] = guard.start_stage_process,
) -> tuple[int, list[str]]:
    """Run ``cmd`` (its own process group), its output line by line to ``on_line``; the
    process group is ended if this is cut short. Returns (exit code, lines)."""
    proc = start(
        cmd,
        cwd=cwd,
        env=env or subprocess_env(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    try:
        for raw in iter(proc.stdout.readline, b''):
            parts = [p for p in raw.rstrip(b'\r\n').split(b'\r') if p.strip()]  # progress bars redraw
            if parts:
                line = parts[-1].decode('utf-8', errors='replace').rstrip()
                lines.append(line)
                if on_line:
                    on_line(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            guard.end_process_group(proc)
            proc.wait()
        guard.forget(proc)
        proc.stdout.close()
    return code, lines


def dvc(root: Path, *args: str, on_line: Callable[[str], None] | None = None, **popen) -> tuple[int, list[str]]:
    """``dvc --wait-for-lock <args>`` in ``root``, run again while it fails on a busy lock."""
    cmd = [sys.executable, '-m', 'dvc', '--wait-for-lock', *args]
    for attempt in range(LOCK_RETRIES + 1):
        code, lines = stream(cmd, Path(root), on_line, **popen)
        busy = any(BUSY.search(line) for line in lines) and not any(line.startswith(STARTED) for line in lines)
        if code == 0 or attempt == LOCK_RETRIES or not busy:  # never run a stage's command twice
            return code, lines
        if on_line:
            on_line(f'[flow] a DVC lock was busy: `dvc {" ".join(args)}` again ({attempt + 1}/{LOCK_RETRIES})')
        time.sleep(min(2.0**attempt, 30.0))
    raise AssertionError('unreachable')


def repro(
    root: Path, stage: str, *, force: bool = False, pull: bool = False, upstream: bool = False, on_line=None, **popen
) -> StageResult:
    """``dvc repro --single-item <stage>`` (with ``upstream``: the stages it depends on too, as
    a fresh clone needs them): ran, restored (from the run-cache) or failed."""
    began = time.monotonic()
    args = ['repro', stage] + ([] if upstream else ['--single-item'])
    args += (['--force'] if force else []) + (['--pull'] if pull else [])
    code, lines = dvc(root, *args, on_line=on_line, **popen)
    seconds = time.monotonic() - began
    if code != 0:
        cause = output.cause_of(lines) or f'`dvc repro` exited with {code}'
        return StageResult(stage, 'failed', seconds, cause, lines[-TAIL_LINES:], code)
    clear_work_dirs(root, stage)  # exported or restored: nothing left to resume
    said = {outcome: any(line.startswith(text.format(stage=stage)) for line in lines) for outcome, text in SAID.items()}
    outcome = next((o for o, found in said.items() if found), 'ran')
    if outcome == 'ran' and (code := record_run_cache(root, stage, on_line=on_line, **popen)[0]):
        if on_line:  # a shortcut for later runs, not this stage's result
            on_line(f'[flow] warning: {stage}: no run-cache entry recorded (flows.run_cache exited with {code})')
    message = {'restored': 'restored from the DVC run-cache', 'skipped': "up to date (DVC: didn't change)"}
    return StageResult(stage, outcome, seconds, message.get(outcome, 'ran'), lines[-TAIL_LINES:])


def record_run_cache(root: Path, stage: str, *, push: bool = False, on_line=None, **popen) -> tuple[int, list[str]]:
    """The run-cache entry that ``dvc repro`` may have skipped (:mod:`flows.run_cache`)."""
    cmd = [sys.executable, '-m', 'flows.run_cache', stage, *(['--push'] if push else [])]
    return stream(cmd, Path(root), on_line, **popen)


def clear_work_dirs(root: Path, stage: str) -> None:
    label = work_dir_label(stage)
    for work_dir in (Path(root) / WORK_ROOT).glob(f'{label}-*'):
        if re.fullmatch(rf'{re.escape(label)}-[0-9a-f]{{12}}', work_dir.name):  # not `...-1-` of `...-10-`
            shutil.rmtree(work_dir, ignore_errors=True)


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    """The stages to bring up to date: their graph (upstream -> downstream), the stages
    ``dvc status`` found changed, and each stage's ``meta`` and tags from dvc.yaml."""

    root: Path
    graph: nx.DiGraph
    changed: set[str]
    meta: dict[str, dict]
    order: list[str]  #: dvc.yaml's order of every stage (for dvc.lock)
    stages: dict[str, object] = field(default_factory=dict, repr=False)  #: DVC's Stage objects, by name
    _items: dict[str, dict] = field(default_factory=dict, repr=False)  # DVC resolves a group's anew at each call

    @classmethod
    def read(cls, root: str | Path, targets: list[str] | None = None) -> Pipeline:
        from dvc.repo import Repo, lock_repo

        root = Path(root).resolve()
        # as `dvc --wait-for-lock status`, under one repository lock: DVC's status, locked on its
        # own, would drop the stage index built for the graph and build it again (0.8 s)
        with Repo(str(root), _wait_for_lock=True) as repo, lock_repo(repo):
            stages = {_name(s, root): s for s in repo.index.stages}
            graph = nx.DiGraph()
            graph.add_nodes_from(stages)
            for down, up in repo.index.graph.edges:  # DVC's edges point upstream
                graph.add_edge(_name(up, root), _name(down, root))
            graph = _select(graph, targets)
            named = {s.addressing: name for name, s in stages.items()}  # DVC's keys: relative to the cwd
            changed = {named[k] for k in repo.status() if k in named}  # at once: per target is 7x slower
            meta = {name: dict(stages[name].meta or {}) for name in graph.nodes}
        return cls(root, graph, changed & set(graph.nodes), meta, list(stages), stages)

    def to_run(self, force: bool = False) -> set[str]:
        """Changed stages and everything downstream of them (``dvc repro`` decides again for
        those, after their upstream ran); with ``force``, every stage."""
        if force:
            return set(self.graph.nodes)
        out = set(self.changed)
        for stage in self.changed:
            out |= nx.descendants(self.graph, stage)
        return out

    def schedule(self) -> list[str]:
        """Dependency order; among stages ready at the same time, the one with the most stages
        downstream first (then by name), so the teachers start before the baselines."""
        graph = self.graph
        return list(nx.lexicographical_topological_sort(graph, key=lambda s: (-len(nx.descendants(graph, s)), s)))

    def tags(self, stage: str) -> list[str]:
        """Tags to filter a stage's task runs by: its dvc.yaml group (``distill``) and, for a
        ``matrix`` stage, each axis as ``axis:value`` (``method:mgd``, ``seed:0``); for a
        ``foreach`` stage, its key. Asked for the stages that run only (0.3 s for all 53)."""
        group, _, key = self.stages[stage].name.partition('@')
        if not key:
            return [group]
        if group not in self._items:
            self._items[group] = _matrix_items(self.stages[stage].dvcfile, group)
        item = self._items[group].get(key)
        if item is None:
            return [group, key]
        return [group] + [f'{axis}:{value}' for axis, value in item.items()]

    def direct_upstream(self) -> dict[str, list[str]]:
        """Each stage's upstream stages that no other upstream stage already depends on (the
        graph's transitive reduction): waiting for those is waiting for all, and the run graph
        draws about half of DVC's dependencies (``benchmarks/graph_size.py``)."""
        reduced = nx.transitive_reduction(self.graph)
        return {stage: sorted(reduced.predecessors(stage)) for stage in self.graph.nodes}


def _name(stage, root: Path) -> str:
    """The stage's name as ``dvc repro`` in ``root`` takes it (DVC's own ``addressing`` is
    relative to this process's working directory)."""
    path = Path(stage.path)
    if path.parent == root and path.name == 'dvc.yaml':
        return stage.name
    return f'{os.path.relpath(path, root)}:{stage.name}'


def _matrix_items(dvcfile, group: str) -> dict[str, dict]:
    """A ``matrix`` group's stages: key -> {axis: value} of scalar values; {} for another kind."""
    from dvc.parsing import MatrixDefinition

    definition = getattr(getattr(dvcfile, 'resolver', None), 'definitions', {}).get(group)
    if not isinstance(definition, MatrixDefinition):
        return {}
    items = {}
    for key, item in definition.normalized_iterable.items():
        values = {axis: getattr(value, 'value', value) for axis, value in item.items()}  # DVC wraps numbers
        items[key] = {axis: v for axis, v in values.items() if isinstance(v, (str, int, float))}
    return items


def _select(graph: nx.DiGraph, targets: list[str] | None) -> nx.DiGraph:
    if not targets:
        return graph
    keep: set[str] = set()
    for target in targets:
        matched = [n for n in graph.nodes if n == target or n.startswith(f'{target}@')]
        if not matched:
            raise PipelineError(f"no DVC stage named '{target}' (known: {', '.join(sorted(graph.nodes))})")
        for node in matched:
            keep |= {node} | nx.ancestors(graph, node)
    return graph.subgraph(keep).copy()


def normalise_lock(root: Path, order: list[str]) -> None:
    """Put dvc.lock's stages in dvc.yaml's ``order``: DVC appends an entry when a stage first
    completes, so with stages at once the order (not the content) would depend on timing."""
    from ruamel.yaml import YAML

    from dfmsd.core.io import write_text

    path = Path(root) / 'dvc.lock'
    if not path.is_file():
        return
    yaml = YAML()  # round trip: DVC's own library and style
    lock = yaml.load(path.read_text())
    stages = lock.get('stages') or {}
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(stages, key=lambda name: rank.get(name, len(rank)))
    if ordered == list(stages):
        return
    items = [(name, stages[name]) for name in ordered]
    for name in ordered:
        del stages[name]
    for name, entry in items:
        stages[name] = entry
    buf = io.StringIO()
    yaml.dump(lock, buf)
    write_text(path, buf.getvalue())


def summary_table(results: list[StageResult]) -> str:
    counts: dict[str, int] = {}
    lines = ['| stage | result | time | where | details |', '|---|---|---|---|---|']
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        details = r.message.replace('|', '\\|')
        lines.append(f'| `{r.stage}` | {r.outcome} | {r.seconds:.1f} s | {r.where} | {details} |')
    lines += ['', ', '.join(f'{n} {k}' for k, n in counts.items())]
    return '\n'.join(lines) + '\n'
