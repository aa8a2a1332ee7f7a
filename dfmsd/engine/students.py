"""The student's runs: its seeded initialisation, the baseline, and its distillations.

Every distillation row has the same budget (``train.iters``) and the same schedule (warm-up,
then cosine decay over all of it), unless its method states another (``budget``: a multiple of
``train.iters``, for the ablations that ask what a longer schedule buys). A SAL row is that one schedule cut in two at
``split * iters``: stage 1 learns from the pair's weak teacher and ends with its resumable
training state; stage 2 continues that state (optimizer, learning-rate position, loss
modules, cost counters) with the strong teacher. So a single-stage row differs from a SAL
row only in the teacher schedule.
"""

from __future__ import annotations

import copy
from pathlib import Path

from dfmsd.core.errors import DistillError
from dfmsd.core.kinds import RunKind
from dfmsd.core.params import Data, Detector, Distill, Launch, Method, Runtime, SALMethod, Train
from dfmsd.engine.configs import detector_config, distill_config, probe_size_of, register_project_types, training_config
from dfmsd.engine.launch import apply_launcher, maybe_relaunch
from dfmsd.engine.training import train_and_export


def init_student(spec: Detector, data: Data, seed: int, out: str | Path, where: str) -> None:
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    from mmengine.runner import set_random_seed

    from dfmsd.data.coco import dataset_classes, split_files
    from dfmsd.engine.checkpoint import export_plain_checkpoint

    register_project_types()
    cfg = detector_config(spec, data, where)
    init_default_scope('mmdet')
    set_random_seed(seed, deterministic=True)
    model = MODELS.build(cfg.model)
    model.init_weights()
    classes = list(dataset_classes(split_files(data, 'train')[0]))
    export_plain_checkpoint(
        model.state_dict(), Path(out) / 'model.pth', meta={'seed': seed, 'dataset_meta': {'classes': classes}}
    )
    cfg.dump(str(Path(out) / 'model.py'))
    print(f'[student_init] {where}, seed {seed}: {out}/model.pth')


def train_baseline(
    spec: Detector,
    data: Data,
    train: Train,
    runtime: Runtime,
    launch: Launch,
    *,
    seed: int,
    init: str,
    out: str,
    loss_log: str,
    identity: dict,
) -> None:
    maybe_relaunch(launch)
    register_project_types()

    cfg = training_config(spec, data, train, train.iters, seed, f'students.{identity["student"]}')
    cfg.load_from = str(Path(init) / 'model.pth')
    student_cfg = copy.deepcopy(cfg)
    apply_launcher(cfg, launch)
    train_and_export(
        cfg, out_dir=out, student_cfg=student_cfg, loss_csv=loss_log, threads=runtime.threads, identity=identity
    )


def sal_boundary(method: SALMethod, iters: int) -> int:
    return max(1, min(iters - 1, round(method.split * iters)))


def distill_student(
    *,
    kind: RunKind,
    method: Method,
    student: Detector,
    data: Data,
    train: Train,
    distill: Distill,
    runtime: Runtime,
    launch: Launch,
    seed: int,
    teacher: str,
    init: str,
    me_table: str | None,
    out: str,
    loss_log: str,
    identity: dict,
) -> None:
    """One distillation stage (see the module docstring); ``kind``: one of dfmsd.core.kinds.DISTILL_KINDS."""
    maybe_relaunch(launch)
    register_project_types()

    where = f'students.{identity["student"]}'
    iters = method.iters(train.iters)
    if kind.sal_stage:
        method = method.at_stage(kind.sal_stage)
    student_cfg = training_config(student, data, train, iters, seed, where)
    boundary = sal_boundary(method, iters) if kind.sal_stage else None
    stop_at = boundary if kind.keeps_state else None  # stage 1 ends at the boundary, stage 2 starts there
    start = boundary if kind.resumes else None
    uses_me = kind.uses_me(method)
    if uses_me and not me_table:
        raise DistillError(f'{kind} of {identity["method"]} adds ME views: its dvc.yaml command must pass --me-table')
    cfg = distill_config(
        student_cfg,
        teacher,
        method,
        train=train,
        iters=iters,
        seed=seed,
        min_cells=distill.min_cells,
        probe_size=probe_size_of(data, student_cfg),
        me_table=me_table if uses_me else None,
        stop_at=stop_at,
        lr=student.lr,
    )
    resume_from = None
    if kind.resumes:
        resume_from = str(Path(init) / 'state.pth')
        cfg.custom_hooks.append(dict(type='SALHandoff', boundary=start, reset_modules=method.reset_modules, seed=seed))
    else:
        cfg.model.student_init = str(Path(init) / 'model.pth')
    apply_launcher(cfg, launch)
    train_and_export(
        cfg,
        out_dir=out,
        student_cfg=student_cfg,
        loss_csv=loss_log,
        threads=runtime.threads,
        identity={**identity, 'uses_me': uses_me},
        prefix='student.',
        keep_state=kind.keeps_state,
        resume_from=resume_from,
        start_iter=start or 0,
    )
