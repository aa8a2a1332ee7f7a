"""The DVC pipeline as a graph of stages, read through DVC's own index.

DVC 3.x has no public Python API for this, so we use the (stable, long-lived) internal one
that ``dvc dag`` and ``dvc repro`` use themselves:

- ``dvc.repo.Repo(root).index.stages``: every stage of every ``dvc.yaml`` in the repository,
  with ``foreach``/``matrix`` stages already expanded (``train@teacher_weak``), plus the
  data-source stages of ``.dvc`` files, which have no command and are left out here;
- ``Repo.index.graph``: a ``networkx.DiGraph`` with an edge ``B -> A`` whenever a dependency
  of stage ``B`` is, lies inside, or contains an output of stage ``A`` (DVC builds it with a
  trie of output paths, the exact rule ``dvc repro`` follows).

Running a stage and asking whether it changed are done with the ``dvc`` command line
(:func:`repro_command`, :func:`stage_status`), in a subprocess, as DVC has no supported
in-process entry point for them either.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "DvcCommandError",
    "Pipeline",
    "StageInfo",
    "dvc_command",
    "load_pipeline",
    "repro_command",
    "stage_status",
]

#: DVC prints this when another DVC process holds the repository lock.
LOCK_ERROR_MARKERS = ("Unable to acquire lock", "is busy, it is being blocked by")


class DvcCommandError(RuntimeError):
    """A ``dvc`` command (other than the stage command itself) failed."""


@dataclass(frozen=True)
class StageInfo:
    """One runnable DVC stage (a ``dvc.yaml`` stage, foreach/matrix items expanded)."""

    name: str  #: address for ``dvc repro``/``dvc status``: ``train@a`` or ``sub/dvc.yaml:train@a``
    cmd: str
    dvcfile: str  #: the ``dvc.yaml`` it comes from, relative to the repository root
    deps: tuple[str, ...] = ()  #: dependency paths, relative to the repository root (POSIX)
    outs: tuple[str, ...] = ()  #: output paths (metrics and plots included)
    metrics: tuple[str, ...] = ()  #: outputs declared as ``metrics:``
    frozen: bool = False

    @property
    def group(self) -> str:
        """The stage's name without its foreach/matrix key (``train`` for ``train@a``)."""
        return self.name.split("@", 1)[0]


@dataclass
class Pipeline:
    """Stages in a topological order, and each stage's direct upstream stages."""

    root: Path
    stages: dict[str, StageInfo]
    upstream: dict[str, frozenset[str]]
    #: metrics files declared at the top level of a dvc.yaml (``metrics:`` list), with the
    #: stage producing each one (``None`` when no stage does).
    top_level_metrics: dict[str, str | None] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.stages)

    def downstream(self) -> dict[str, frozenset[str]]:
        down: dict[str, set[str]] = {name: set() for name in self.stages}
        for name, ups in self.upstream.items():
            for up in ups:
                down[up].add(name)
        return {name: frozenset(d) for name, d in down.items()}

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = [name]
        while todo:
            for up in self.upstream[todo.pop()]:
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return seen

    def resolve_target(self, target: str) -> list[str]:
        """Stage names a target means: a stage name, or a foreach/matrix group name."""
        if target in self.stages:
            return [target]
        # "dvc.yaml:stage" for the root dvc.yaml is the same as "stage"
        if target.startswith("dvc.yaml:") and target[len("dvc.yaml:") :] in self.stages:
            return [target[len("dvc.yaml:") :]]
        group = [name for name, st in self.stages.items() if st.group == target]
        if group:
            return group
        known = ", ".join(self.stages) or "(none)"
        raise ValueError(f"unknown DVC stage {target!r}; stages of this pipeline: {known}")

    def select(self, targets: list[str] | tuple[str, ...] | None) -> "Pipeline":
        """The sub-pipeline made of ``targets`` and everything upstream of them."""
        if not targets:
            return self
        keep: set[str] = set()
        for target in targets:
            for name in self.resolve_target(target):
                keep.add(name)
                keep |= self.ancestors(name)
        stages = {name: st for name, st in self.stages.items() if name in keep}
        upstream = {name: self.upstream[name] & keep for name in stages}
        return Pipeline(self.root, stages, upstream, dict(self.top_level_metrics))


def _relpath(path: str | os.PathLike, root: Path) -> str:
    return Path(os.path.relpath(os.fspath(path), root)).as_posix()


def _path(item, root: Path) -> str:
    """A dependency's/output's path relative to the root; as written when not local."""
    if getattr(item, "is_in_repo", True):
        return _relpath(item.fs_path, root)
    return str(item.def_path)


def _address(stage, root: Path) -> str:
    dvcfile = _relpath(stage.path, root)
    return stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def _topological(names: list[str], upstream: dict[str, frozenset[str]]) -> list[str]:
    """Kahn's algorithm; among ready stages, the one declared first goes first."""
    position = {name: i for i, name in enumerate(names)}
    remaining = {name: len(upstream[name]) for name in names}
    down: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        for up in upstream[name]:
            down[up].append(name)
    ready = [(position[n], n) for n in names if remaining[n] == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for nxt in down[name]:
            remaining[nxt] -= 1
            if remaining[nxt] == 0:
                heapq.heappush(ready, (position[nxt], nxt))
    if len(order) != len(names):  # DVC refuses cycles itself; be safe anyway
        raise ValueError("the DVC pipeline has a cycle: " + ", ".join(sorted(set(names) - set(order))))
    return order


def load_pipeline(repo_dir: str | os.PathLike = ".") -> Pipeline:
    """Read every runnable stage of the DVC repository at (or above) ``repo_dir``."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(os.fspath(repo_dir)) as repo:
        root = Path(repo.root_dir).resolve()
        index = repo.index
        graph = index.graph
        stages = [s for s in index.stages if isinstance(s, PipelineStage)]
        names = {s: _address(s, root) for s in stages}
        infos: dict[str, StageInfo] = {}
        upstream: dict[str, frozenset[str]] = {}
        for stage in stages:
            name = names[stage]
            infos[name] = StageInfo(
                name=name,
                cmd=stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd or []),
                dvcfile=_relpath(stage.path, root),
                deps=tuple(_path(d, root) for d in stage.deps),
                outs=tuple(_path(o, root) for o in stage.outs),
                metrics=tuple(_path(o, root) for o in stage.outs if o.metric),
                frozen=bool(stage.frozen),
            )
            # DVC's graph points from a stage to the stages it depends on.
            upstream[name] = frozenset(names[s] for s in graph.successors(stage) if s in names)

        producers = {out: name for name, st in infos.items() for out in st.outs}
        top_level: dict[str, str | None] = {}
        try:
            from dvc.repo.metrics.show import _collect_top_level_metrics

            top_paths = [Path(p).as_posix() for p in _collect_top_level_metrics(repo)]
        except ImportError:  # older/newer DVC without that helper: no top-level metrics
            top_paths = []
        for rel in top_paths:
            top_level[rel] = producers.get(rel)

    order = _topological(list(infos), upstream)
    return Pipeline(
        root=root,
        stages={name: infos[name] for name in order},
        upstream={name: upstream[name] for name in order},
        top_level_metrics=top_level,
    )


# --------------------------------------------------------------------------- dvc commands


@functools.lru_cache(maxsize=1)
def _supports_wait_for_lock() -> bool:
    """Whether this DVC has the global ``--wait-for-lock`` option (DVC >= 3.4x)."""
    try:
        from dvc.repo import Repo

        return "_wait_for_lock" in inspect.signature(Repo.__init__).parameters
    except Exception:
        return False


def dvc_command(*args: str) -> list[str]:
    """A ``dvc`` command line run by this interpreter (no reliance on ``PATH``).

    With ``--wait-for-lock`` where DVC has it: stages running side by side each take the
    repository lock briefly (before and after their command, not while it runs), and a
    DVC process that finds it taken then waits instead of failing.
    """
    return [sys.executable, "-m", "dvc", *(["--wait-for-lock"] if _supports_wait_for_lock() else []), *args]


def repro_command(stage: str, force: bool = False) -> list[str]:
    """``dvc repro --single-item <stage>``: run that stage only, never its upstream."""
    return dvc_command("repro", "--single-item", *(["--force"] if force else []), stage)


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for DVC and stage commands: unbuffered Python output, so logs stream."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def is_lock_error(output: str) -> bool:
    return any(marker in output for marker in LOCK_ERROR_MARKERS)


def stage_status(repo_dir: str | os.PathLike, stage: str, lock_wait_s: float = 120.0) -> list:
    """What changed in one stage, according to ``dvc status --json <stage>``.

    An empty list means up to date. Without ``--with-deps`` DVC checks that stage alone
    (its command, the hashes of its dependencies and outputs against ``dvc.lock``), so a
    change upstream shows here only once the upstream stage has re-run and rewritten the
    files this stage depends on, which is the order the flow runs them in.
    """
    deadline = time.monotonic() + lock_wait_s
    delay = 0.5
    while True:
        proc = subprocess.run(
            dvc_command("status", "--json", stage),
            cwd=os.fspath(repo_dir),
            env=subprocess_env(),
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0:
            break
        output = proc.stdout + proc.stderr
        if is_lock_error(output) and time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        raise DvcCommandError(
            f"`dvc status {stage}` failed with exit code {proc.returncode}:\n{output.strip()}"
        )
    text = proc.stdout.strip()
    if not text:
        return []
    # `--json` prints one JSON document; tolerate log lines printed before it
    start = text.find("{")
    status = json.loads(text[start:]) if start >= 0 else {}
    # one stage asked for: its entry is keyed by its address as DVC spells it (relative
    # to the cwd); take whatever is there rather than rely on the spelling
    return [change for changes in status.values() for change in changes]
