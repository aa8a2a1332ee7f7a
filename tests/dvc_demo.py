"""A tiny, real DVC project for testing the Prefect flow and its Dask workers: cheap Python stages.

Shape (``prepare`` has a directory output that ``left`` depends on a file inside of)::

    prepare ──> left ──> train@small ──┐
       │                 train@large ──┼──> report   (reports/results.md, reports/summary.json, metrics.json)
       └──────> right ─────────────────┘
    lonely                                            (independent of all others)

Every stage command is ``python step.py NAME --in ... --out ...`` run through
``dfmsd.core.cli.run``. The ``train@*`` stages behave like training stages
(dfmsd.engine.training; dvc.yaml ``meta: {engine: dask}``, so the flow runs them on Dask
workers): they "train" (print mmengine ``Iter(train) [i/n]`` lines, sleep) into their work dir
``work_dirs/<stage>-<digest>`` unless it holds a finished run, then export and remove it.

Each command appends ``NAME PHASE start <t>`` and ``NAME PHASE end <t>`` to ``run.log`` (not
tracked): PHASE is ``train`` for a training, else ``none``. Outputs depend only on the inputs (and
the ``seeds`` param of ``prepare``), so a changed input changes what is downstream of it.
params.yaml is the project's own (a preset is validated against its schema).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from support import REPO

__all__ = [
    'STAGES',
    'EDGES',
    'TRAINING',
    'make_project',
    'make_shaped_project',
    'read_run_log',
    'commands_run',
    'dvc_env',
    'git_commit',
]

#: stage names, foreach items expanded
STAGES = ['prepare', 'left', 'right', 'train@small', 'train@large', 'report', 'lonely']
#: the stages the flow runs on Dask workers
TRAINING = ['train@small', 'train@large']
#: (upstream, downstream) pairs
EDGES = [
    ('prepare', 'left'),
    ('prepare', 'right'),
    ('left', 'train@small'),
    ('left', 'train@large'),
    ('right', 'report'),
    ('train@small', 'report'),
    ('train@large', 'report'),
]

STEP_PY = r"""
import argparse, hashlib, json, os, pathlib, re, shutil, sys, time

import yaml

from dfmsd.core import cli

p = argparse.ArgumentParser()
p.add_argument('name')
p.add_argument('--in', dest='inputs', action='append', default=[])
p.add_argument('--out', dest='outputs', action='append', default=[])
p.add_argument('--param', action='append', default=[], help='a key of params.yaml the output depends on')
p.add_argument('--metrics')
p.add_argument('--summary')
p.add_argument('--sleep', type=float, default=0.0)
p.add_argument('--flaky', help='counter file: fail on the first call, succeed after')
p.add_argument('--train', type=int, default=0, help='a training stage of N iterations')
p.add_argument('--fail-training', action='store_true', help='the training phase exits with 4')
p.add_argument('--await-partner', type=float, default=0.0, help='see await_partner()')
a = p.parse_args()


def log(event, phase='none'):
    with open('run.log', 'a') as f:
        f.write(f'{a.name} {phase} {event} {time.time():.6f}\n')


def digest():
    h = hashlib.sha256(a.name.encode())
    params = yaml.safe_load(open('params.yaml')) if a.param else {}
    for key in a.param:
        h.update(json.dumps(params[key], sort_keys=True).encode())
    for src in a.inputs:
        h.update(pathlib.Path(src).read_bytes())
    return h.hexdigest()


def await_partner():
    # wait up to --await-partner seconds for another stage to start training, then 0.5 s more
    deadline = time.time() + a.await_partner
    while time.time() < deadline:
        lines = [line.split() for line in open('run.log').read().splitlines()]
        if any(w[0] != a.name and w[1:3] == ['train', 'start'] for w in lines):
            time.sleep(0.5)
            return
        time.sleep(0.05)


def train(work):
    log('start', 'train')
    print(f'[{a.name}] training in {work}', flush=True)
    memo = os.environ.get('DFMSD_TEACHER_MEMO')  # as a distillation reads and fills the run's memo
    print(f'[{a.name}] teacher memo: {memo}', flush=True)
    if memo:
        pathlib.Path(memo, a.name).mkdir(parents=True, exist_ok=True)
    if a.fail_training:  # as dfmsd's divergence hook stops a run: after its first logged iteration
        print(f'2026/01/01 00:00:00 - mmengine - INFO - Iter(train) [1/{a.train}]  loss: inf', flush=True)
        print(f'error [{a.name}]: training diverged: loss inf at iteration 1', file=sys.stderr, flush=True)
        sys.exit(4)
    for i in range(1, a.train + 1):
        print(f'2026/01/01 00:00:00 - mmengine - INFO - Iter(train) [{i}/{a.train}]  lr: 1.0e-02  '
              f'eta: 0:00:0{a.train - i}', flush=True)
        time.sleep(a.sleep / max(a.train, 1))
    if a.await_partner:
        await_partner()
    work.mkdir(parents=True, exist_ok=True)
    (work / 'final.txt').write_text(digest())
    log('end', 'train')


def main():
    if a.flaky:
        counter = pathlib.Path(a.flaky)
        n = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(n))
        if n == 1:
            print(f'[{a.name}] flaky failure on attempt {n}', flush=True)
            sys.exit(5)
    if a.train:
        label = re.sub(r'[^A-Za-z0-9_.-]+', '-', os.environ.get('DVC_STAGE', a.name))
        work = pathlib.Path('work_dirs') / f'{label}-{digest()[:12]}'
        if not (work / 'final.txt').is_file():  # else: a finished training, not exported yet
            train(work)
    else:
        log('start')
        print(f'[{a.name}] starting', flush=True)
        time.sleep(a.sleep)
    value = digest()
    for dst in a.outputs:
        out = pathlib.Path(dst)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == '.md':
            out.write_text(f'# Results\n\n| stage | digest |\n|---|---|\n| {a.name} | {value[:12]} |\n')
        else:
            out.write_text(f'{a.name} {value}\n')
    if a.metrics:
        pathlib.Path(a.metrics).write_text(json.dumps({'mAP': 0.5, 'detail': {'mAP_50': 0.75}}))
    if a.summary:
        pathlib.Path(a.summary).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.summary).write_text(json.dumps({
            'retinanet/tiny': {'baseline': {'mAP': 20.5}, 'dfmsd': {'mAP': 22.25, 'gain': 1.75}},
        }, indent=1))
    if a.train:
        shutil.rmtree(work, ignore_errors=True)  # exported: nothing left to resume
        log('exported')
    else:
        log('end')
    print(f'[{a.name}] done', flush=True)


cli.run(main)
"""


def _dvc_yaml(
    py: str,
    fail: str | None,
    flaky: str | None,
    fail_training: str | None,
    sleep: dict[str, float],
    await_partner: float,
) -> dict:
    def cmd(name: str, args: str) -> str:
        if name == fail:
            return 'exit 3'
        extra = f' --flaky counter-{name}.txt' if name == flaky else ''
        if name == 'train@${item}':
            naps = {sleep.get(t, 0.0) for t in TRAINING}
            extra += f' --train 3 --sleep {max(naps)}'  # one command for both foreach items
            if await_partner:
                extra += f' --await-partner {await_partner}'
            if fail_training in TRAINING:
                extra += ' --fail-training'
        elif name in sleep:
            extra += f' --sleep {sleep[name]}'
        return f'{py} step.py {name} {args}{extra}'

    return {
        'stages': {
            'prepare': {
                'cmd': cmd('prepare', '--param seeds --out data/prepared/a.txt'),
                'deps': ['step.py'],
                'params': ['seeds'],
                'outs': ['data/prepared'],
            },
            'left': {
                'cmd': cmd('left', '--in data/prepared/a.txt --out data/left.txt'),
                'deps': ['step.py', 'data/prepared/a.txt'],
                'outs': ['data/left.txt'],
            },
            'right': {
                'cmd': cmd('right', '--in data/prepared/a.txt --in right.txt --out data/right.txt'),
                'deps': ['step.py', 'data/prepared', 'right.txt'],
                'outs': ['data/right.txt'],
            },
            'train': {
                'foreach': ['small', 'large'],
                'do': {
                    'meta': {'engine': 'dask'},
                    'cmd': cmd('train@${item}', '--in data/left.txt --out models/${item}.txt'),
                    'deps': ['step.py', 'data/left.txt'],
                    'outs': ['models/${item}.txt'],
                },
            },
            'report': {
                'cmd': cmd(
                    'report',
                    '--in data/right.txt --in models/small.txt --in models/large.txt '
                    '--out reports/results.md --summary reports/summary.json --metrics metrics.json',
                ),
                'deps': ['step.py', 'data/right.txt', 'models/small.txt', 'models/large.txt'],
                'outs': [{'reports/results.md': {'cache': False}}, {'reports/summary.json': {'cache': False}}],
                'metrics': [{'metrics.json': {'cache': False}}],
            },
            'lonely': {
                'cmd': cmd('lonely', '--in lonely.txt --out data/lonely.txt'),
                'deps': ['step.py', 'lonely.txt'],
                'outs': ['data/lonely.txt'],
            },
        }
    }


def dvc_env() -> dict[str, str]:
    return dict(os.environ, DVC_NO_ANALYTICS='1')


def git_commit(root: Path, message: str = 'demo') -> None:
    git = ['git', '-c', 'user.email=test@dfmsd', '-c', 'user.name=test']
    subprocess.run(git + ['add', '-A'], cwd=root, check=True)
    subprocess.run(git + ['commit', '-qm', message], cwd=root, check=True)


def make_project(
    path: str | os.PathLike,
    *,
    fail: str | None = None,
    flaky: str | None = None,
    fail_training: str | None = None,
    sleep: dict[str, float] | None = None,
    await_partner: float = 0.0,
    presets: dict[str, dict] | None = None,
    python: str = sys.executable,
) -> Path:
    """Create and commit the demo DVC project in ``path`` (git init, dvc init, analytics off).

    ``fail``: stage whose command is ``exit 3``; ``flaky``: stage failing on its first run
    only; ``fail_training``: a ``train@*`` stage whose training exits with 4 (both items:
    one command); ``sleep``: seconds some stages sleep (training: spread over its iterations);
    ``await_partner``: each training waits up to that long for the other one to start
    training (then trains 0.5 s more), so that two trainings overlap whenever the runner
    lets them, however slow DVC is; ``presets``: ``presets/<name>.yaml`` files to write.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    env = dvc_env()
    subprocess.run(['git', 'init', '-q'], cwd=root, check=True, env=env)
    subprocess.run([python, '-m', 'dvc', 'init', '-q'], cwd=root, check=True, env=env)
    subprocess.run([python, '-m', 'dvc', 'config', 'core.analytics', 'false'], cwd=root, check=True, env=env)
    (root / 'step.py').write_text(STEP_PY)
    shutil.copyfile(REPO / 'params.yaml', root / 'params.yaml')
    (root / 'right.txt').write_text('right input v1\n')
    (root / 'lonely.txt').write_text('lonely input\n')
    (root / '.gitignore').write_text('run.log\ncounter-*.txt\nwork_dirs/\n/.presets/\n')
    stages = _dvc_yaml(shlex.quote(python), fail, flaky, fail_training, sleep or {}, await_partner)
    (root / 'dvc.yaml').write_text(yaml.safe_dump(stages, sort_keys=False, width=200))
    for name, overrides in (presets or {}).items():
        (root / 'presets').mkdir(exist_ok=True)
        (root / 'presets' / f'{name}.yaml').write_text(yaml.safe_dump(overrides, sort_keys=False))
    git_commit(root)
    return root


def read_run_log(root: str | os.PathLike) -> list[tuple[str, str, str, float]]:
    """``(stage, phase, event, time)`` entries of ``run.log``, in file order; phase is
    train | none, event start | end | exported."""
    log = Path(root) / 'run.log'
    if not log.exists():
        return []
    entries = []
    for line in log.read_text().splitlines():
        name, phase, event, when = line.rsplit(' ', 3)
        entries.append((name, phase, event, float(when)))
    return entries


def commands_run(root: str | os.PathLike) -> list[str]:
    """Stages whose command did its work (a stage that trains counts once), in start order."""
    return [name for name, _, event, _ in read_run_log(root) if event == 'start']


def make_shaped_project(path: str | os.PathLike, edges: list[tuple[str, str]]) -> Path:
    """A DVC project with the shape of another pipeline: one stage per name in ``edges``
    (``a@b`` named ``a-at-b``), writing ``out/<stage>.txt``, depending on the outputs of the
    stages upstream of it (each ``(upstream, downstream)`` pair)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    env = dvc_env()
    subprocess.run(['git', 'init', '-q'], cwd=root, check=True, env=env)
    subprocess.run([sys.executable, '-m', 'dvc', 'init', '-q'], cwd=root, check=True, env=env)
    names = sorted({stage for edge in edges for stage in edge})
    upstream = {name: sorted(up for up, down in edges if down == name) for name in names}
    stages = {}
    for name in names:
        stage = name.replace('@', '-at-')
        ins = [f'out/{up.replace("@", "-at-")}.txt' for up in upstream[name]]
        stages[stage] = {'cmd': f'echo {stage} > out/{stage}.txt', 'outs': [f'out/{stage}.txt']}
        if ins:
            stages[stage]['deps'] = ins
    (root / 'out').mkdir()
    (root / 'out' / '.gitkeep').write_text('')
    (root / 'dvc.yaml').write_text(yaml.safe_dump({'stages': stages}, sort_keys=False, width=200))
    git_commit(root)
    return root
