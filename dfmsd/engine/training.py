"""Train a config with mmengine's Runner; export a stock-mmdet student and the run's record.

A run lives in ``work_dirs/<run>-<config digest>/`` until it is exported:

* a stage killed half-way resumes there from its newest hash-verified checkpoint;
* a changed config gets a new digest, and the old directory (which no run can resume any
  more) is removed, with a line in the stage log saying so;
* on a cluster (flows.engine), a stage whose worker died reruns on another worker and
  resumes there, when ``work_dirs/`` is on the shared filesystem.

Exported (``out_dir``): ``model.pth`` (plain weights + ``meta.dataset_meta``), ``model.py``
(its config, for stock mmdet), ``train.py`` (the full training config, runnable by mmdet's tools/train.py),
``losses.pth`` (a distillation's learnt loss modules, plain tensors), ``run.json`` (what the
run is, and what it cost: iterations, images seen, ME views,
images through the teacher) and, for a SAL
stage, ``state.pth`` (+ ``.sha256``): the resumable training state the next stage continues.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config

from dfmsd.core import numerics
from dfmsd.core.io import WORK_ROOT, work_dir_label, write_json, write_text
from dfmsd.data.coco import dataset_classes
from dfmsd.engine.checkpoint import (
    VERIFIED_SCHEME,
    allow_mmengine_checkpoints,
    export_plain_checkpoint,
    is_verified,
    latest_verified_checkpoint,
    load_verified,
    record_hash,
    register_verified_checkpoints,
    save_portable_state,
)
from dfmsd.engine.configs import PROJECT_IMPORTS
from dfmsd.engine.launch import single_process_config


def log(message: str) -> None:
    print(f'[dfmsd] {message}', file=sys.stderr, flush=True)


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(cfg.pretty_text.encode()).hexdigest()[:12]


def run_label() -> str:
    """The work dir's name stem: the DVC stage (DVC sets ``DVC_STAGE``), in file-name-safe form."""
    return work_dir_label(os.environ.get('DVC_STAGE', 'run'))


def _stop_iter(cfg: Config) -> int:
    return int(cfg.train_cfg.get('stop_at') or cfg.train_cfg.max_iters)


def _final_checkpoint(work_dir: Path, stop: int) -> Path | None:
    path = work_dir / f'iter_{stop}.pth'
    return path if is_verified(path) else None


def prepare_work_dir(cfg: Config, work_root: Path = WORK_ROOT) -> Path:
    """``work_root/<run>-<digest>``; other digests of the same run are removed (and said)."""
    label = run_label()
    work_dir = work_root / f'{label}-{config_digest(cfg)}'
    for stale in work_root.glob(f'{label}-*'):
        if stale != work_dir and stale.is_dir() and re.fullmatch(rf'{re.escape(label)}-[0-9a-f]{{12}}', stale.name):
            shutil.rmtree(stale, ignore_errors=True)
            log(f'removed {stale}: it belongs to another config of this run and cannot be resumed by this one')
    if work_dir.is_dir():
        last = latest_verified_checkpoint(work_dir)
        log(f'kept {work_dir}: ' + (f'resuming from {last.name}' if last else 'no verified checkpoint yet'))
    return work_dir


def run_training(
    cfg: Config, *, threads: int, resume_from: str | Path | None = None, work_root: Path = WORK_ROOT
) -> tuple[Path, Path]:
    """Train ``cfg`` to its stop iteration; return (work dir, verified final checkpoint).

    ``resume_from``: a previous SAL stage's state, continued when the work dir has nothing newer.
    """
    from mmengine.dist import barrier, is_main_process

    from dfmsd.engine.runner import build_runner

    torch.set_num_threads(threads)
    allow_mmengine_checkpoints()
    register_verified_checkpoints()
    cfg = copy.deepcopy(cfg)
    work_dir = prepare_work_dir(cfg, work_root)
    stop = _stop_iter(cfg)
    final = _final_checkpoint(work_dir, stop)
    if final:
        return work_dir, final
    cfg.work_dir = str(work_dir)
    cfg.default_hooks.checkpoint.type = 'HashedCheckpointHook'
    last = latest_verified_checkpoint(work_dir)
    start = last or (Path(resume_from) if resume_from else None)
    if start is not None and not is_verified(start):
        from dfmsd.core.errors import CheckpointError

        raise CheckpointError(
            f'{start}: its hash does not match {start}.sha256; rebuild the previous stage '
            f'(`dvc repro`) or restore it (`dvc checkout`)'
        )
    cfg.resume = start is not None
    cfg.load_from = f'{VERIFIED_SCHEME}{start}' if start else cfg.get('load_from')
    if start:
        log(f'resuming from {start}')
    runner = build_runner(cfg)
    runner.train()
    final = work_dir / f'iter_{stop}.pth'
    barrier()  # rank 0 writes checkpoints: every rank waits for its last one before looking
    if is_main_process() and not is_verified(final):  # a SAL stage stops before the last iteration
        runner.save_checkpoint(str(work_dir), final.name)
        record_hash(final)
    barrier()
    return work_dir, final


def collect_scalars(work_dir: str | Path) -> list[dict[str, Any]]:
    """Training scalars logged by LocalVisBackend, across resumed runs, one row per iteration."""
    rows: dict[int, dict[str, Any]] = {}
    for scalars in sorted(Path(work_dir).glob('*/vis_data/scalars.json')):
        for line in scalars.read_text().splitlines():
            row = json.loads(line)
            if 'loss' in row and 'iter' in row:
                rows[int(row['iter'])] = row
    return [rows[i] for i in sorted(rows)]


def write_loss_csv(work_dir: str | Path, path: str | Path, start_iter: int = 0) -> None:
    rows = [r for r in collect_scalars(work_dir) if int(r['iter']) > start_iter]
    keys = ['iter', 'lr'] + sorted({k for r in rows for k in r if k == 'loss' or k.startswith('loss_')})

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def export(
    final: Path,
    work_dir: Path,
    *,
    out_dir: str | Path,
    train_cfg: Config,
    student_cfg: Config,
    loss_csv: str | Path,
    identity: dict,
    prefix: str = '',
    keep_state: bool = False,
    start_iter: int = 0,
) -> dict:
    """Write the run's outputs (see the module docstring) from its final checkpoint."""
    out_dir = Path(out_dir)
    checkpoint = load_verified(final, map_location='cpu')
    state = checkpoint['state_dict']
    iters = int(checkpoint['meta']['iter'])
    batch = int(train_cfg.train_dataloader.batch_size)
    counted = {k: int(state[f'{k}']) for k in ('images_seen', 'views_seen', 'teacher_images') if k in state}
    record = {
        **identity,
        'iters': iters,
        'start_iter': start_iter,
        'batch_size': batch,
        'images_seen': counted.get('images_seen', (iters - start_iter) * batch),
        'views_seen': counted.get('views_seen', 0),
        'teacher_images': counted.get('teacher_images', 0),
        'config_digest': work_dir.name.rsplit('-', 1)[-1],
        'threads': torch.get_num_threads(),
        # what the floats depend on besides the inputs: another CPU model or code path, other bits
        'machine': {
            **numerics.machine(),
            'torch': torch.__version__,
            'cpu_capability': torch.backends.cpu.get_cpu_capability(),
        },
    }
    if 'distilled_strides' in state:  # the FPN levels the distiller used
        record['strides'] = [int(s) for s in state['distilled_strides'].tolist()]
    classes = dataset_classes(
        Path(student_cfg.train_dataloader.dataset.data_root, student_cfg.train_dataloader.dataset.ann_file)
    )
    export_plain_checkpoint(
        state, out_dir / 'model.pth', prefix=prefix, meta={'iters': iters, 'dataset_meta': {'classes': list(classes)}}
    )
    _stock(student_cfg).dump(str(out_dir / 'model.py'))
    _rerunnable(train_cfg).dump(str(out_dir / 'train.py'))
    if any(k.startswith('losses.') for k in state):  # the distiller's learnt loss modules (DMKD's G, SE...)
        export_plain_checkpoint(state, out_dir / 'losses.pth', prefix='losses.')
    if keep_state:
        save_portable_state(checkpoint, out_dir / 'state.pth')
    write_json(out_dir / 'run.json', record)
    write_loss_csv(work_dir, loss_csv, start_iter)
    return record


def _rerunnable(cfg: Config) -> Config:
    """The training config as stock tools/train.py takes it: no work dir or resume of ours, and
    ``custom_imports`` for the project's types (a baseline's config names our loop and hooks too)."""
    out = copy.deepcopy(cfg)
    for key in ('work_dir', 'resume', 'load_from'):
        out.pop(key, None)
    if out.default_hooks.checkpoint.get('type') == 'HashedCheckpointHook':
        out.default_hooks.checkpoint.type = 'CheckpointHook'
    out.custom_imports = out.get('custom_imports') or copy.deepcopy(PROJECT_IMPORTS)
    return single_process_config(out)


def _ours(registry, name: str) -> bool:
    found = registry.get(name)
    return found is not None and found.__module__.startswith('dfmsd.')


def _stock(cfg: Config) -> Config:
    """The student's config as stock mmdet takes it (``model.py``: init_detector, tools/test.py):
    without the project's types, which only its training used (loop, hooks, trackers)."""
    from mmdet.registry import HOOKS, LOOPS, VISBACKENDS

    out = single_process_config(copy.deepcopy(cfg))
    out.pop('custom_imports', None)
    out.custom_hooks = [h for h in out.get('custom_hooks') or [] if not _ours(HOOKS, h['type'])]
    if out.get('visualizer'):
        out.visualizer.vis_backends = [
            b for b in out.visualizer.get('vis_backends') or [] if not _ours(VISBACKENDS, b['type'])
        ]
    if out.get('train_cfg') and _ours(LOOPS, out.train_cfg.get('type', '')):  # StagedIterBasedTrainLoop
        out.train_cfg = dict({k: v for k, v in out.train_cfg.items() if k != 'stop_at'}, type='IterBasedTrainLoop')
    return out


def train_and_export(
    cfg: Config,
    *,
    out_dir: str | Path,
    student_cfg: Config,
    loss_csv: str | Path,
    threads: int,
    identity: dict,
    prefix: str = '',
    keep_state: bool = False,
    resume_from: str | Path | None = None,
    start_iter: int = 0,
) -> dict | None:
    """Train (or find the finished training of) ``cfg`` and export it; see the module docstring."""
    from mmengine.dist import is_main_process

    work_dir, final = run_training(cfg, threads=threads, resume_from=resume_from)
    if not is_main_process():  # rank 0 exports
        return None
    record = export(
        final,
        work_dir,
        out_dir=out_dir,
        train_cfg=cfg,
        student_cfg=student_cfg,
        loss_csv=loss_csv,
        identity=identity,
        prefix=prefix,
        keep_state=keep_state,
        start_iter=start_iter,
    )
    shutil.rmtree(work_dir, ignore_errors=True)  # exported: nothing left to resume
    log(
        f'exported {out_dir} ({record["iters"]} iterations, {record["images_seen"]} images'
        + (f', {record["views_seen"]} ME views' if record['views_seen'] else '')
        + ')'
    )
    return record
