"""Training, teacher boxes and evaluation split across processes (torchrun + mmengine's
``pytorch`` launcher), on the CPU with 2 gloo processes, against the 1-process run.

The stage scripts run as DVC runs them (``DVC_STAGE`` set, params from ``dvc.api.params_show``)
in a copy of the project whose params.yaml says ``launch: {nproc_per_node: 2, backend: gloo}``;
``DFMSD_LAUNCH_NPROC_PER_NODE=1`` makes the 1-process reference runs. One stage goes through
``dvc repro --single-item`` itself. Each process uses one torch/OpenMP thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support import REPO, copy_project, env, preset_params

ITERS = 4  # every training run
STUDENT, PAIR, SEED = 'retinanet', 'tiny', 0
INIT = f'models/students/{STUDENT}/seed{SEED}/init'
WEAK = f'models/teachers/{PAIR}/weak'
ME_TABLE = f'data/me/{PAIR}/seed{SEED}.json'
LATE_RANK_1 = Path(__file__).parent / 'late_rank_1'  # a sitecustomize.py
#: variables of an enclosing torchrun or launch override, which would change what a stage does
INHERITED = ('LOCAL_RANK', 'RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def stage(root: Path, name: str, *cmd: str, procs: int | None = None, timeout: int = 300, late_rank_1: bool = False):
    """``cmd`` run as DVC stage ``name`` (a stage script, or ``-m dvc ...``); ``procs`` overrides
    params.yaml's launch.nproc_per_node. Every torchrun gets a fresh master port. ``late_rank_1``:
    rank 1 ends each test epoch 2 s after rank 0 (tests/late_rank_1/sitecustomize.py)."""
    extra = dict(DVC_STAGE=name, OMP_NUM_THREADS='1', DFMSD_LAUNCH_MASTER_PORT=str(free_port()))
    if procs is not None:
        extra['DFMSD_LAUNCH_NPROC_PER_NODE'] = str(procs)
    path = [str(LATE_RANK_1)] if late_rank_1 else []
    variables = env(PYTHONPATH=os.pathsep.join([*path, str(root)]), **extra)
    for key in [k for k in variables if k in INHERITED or (k.startswith('DFMSD_LAUNCH_') and k not in extra)]:
        del variables[key]
    start = time.monotonic()
    res = subprocess.run(
        [sys.executable, *cmd], cwd=root, env=variables, capture_output=True, text=True, timeout=timeout
    )
    print(f'{name} ({procs or "params"} processes): {time.monotonic() - start:.1f} s')
    out = res.stdout + res.stderr
    assert res.returncode == 0, f'{name}: {cmd} exited {res.returncode}:\n{out[-6000:]}'
    return out


def assert_two_ranks(out: str) -> None:
    assert 'torch.distributed.run --nproc_per_node 2 --nnodes 1 --node_rank 0' in out, out[-3000:]
    for rank in (0, 1):
        assert f'[launch] rank {rank}/2 ' in out, out[-3000:]


def assert_one_process(out: str) -> None:
    assert '[launch]' not in out, out[-3000:]


@pytest.fixture(scope='module')
def project(tmp_path_factory):
    """Smoke preset on fewer images (odd val/test counts: the last 2-process batch is padded),
    ``launch: 2 gloo processes``. Made in one process: the data, the weak teacher (a Faster
    R-CNN: its untrained heads already score many boxes), the student init, and a reference
    baseline export (models/reference)."""
    params = preset_params('smoke')
    for split, images in (('train', 16), ('val', 7), ('test', 5)):
        params['data']['splits'][split]['images'] = images
    params['seeds'] = [SEED]
    params['train'].update(batch_size=2, iters=ITERS, checkpoint_interval=2)
    for role in ('weak', 'strong'):
        params['pairs'][PAIR][role]['iters'] = ITERS
    params['launch'] = {'nproc_per_node': 2, 'nnodes': 1, 'backend': 'gloo', 'master_port': free_port()}
    root = copy_project(tmp_path_factory.mktemp('dist') / 'project', params=params)
    stage(root, 'data', 'stages/data.py', '--root', 'data/synthetic', '--manifest', 'data/dataset.json')
    out = stage(
        root, f'teacher@{PAIR}-weak', 'stages/teacher.py', '--pair', PAIR, '--role', 'weak',
        '--out', WEAK, '--log', f'logs/teachers/{PAIR}/weak.csv', procs=1,
    )  # fmt: skip
    assert_one_process(out)
    stage(root, f'student_init@{STUDENT}-{SEED}', 'stages/student_init.py', *student_args('init', init=False))
    baseline(root, 'models/reference', procs=1)
    return root


def student_args(run: str, *, init: bool = True) -> list[str]:
    args = ['--student', STUDENT, '--seed', str(SEED)]
    if init:
        args += ['--init', INIT, '--log', f'logs/{run}.csv']
    return [*args, '--out', run if run.startswith('models/') else f'models/students/{STUDENT}/seed{SEED}/{run}']


def baseline(root: Path, out: str, *, procs: int | None = None) -> str:
    return stage(root, f'baseline@{STUDENT}-{SEED}', 'stages/baseline.py', *student_args(out), procs=procs)


def evaluate(root: Path, model: str, tag: str, *, procs: int | None = None, name: str | None = None) -> str:
    return stage(
        root, name or f'evaluate_teacher@{PAIR}-weak', 'stages/evaluate.py', '--model', model,
        '--predictions', f'predictions/{tag}', '--metrics', f'metrics/{tag}.json', procs=procs,
    )  # fmt: skip


def detections(path: Path) -> set[tuple]:
    """A COCO results file as a set of (image, category, box to 0.01 px, score to 1e-4)."""
    return {
        (d['image_id'], d['category_id'], tuple(round(v, 2) for v in d['bbox']), round(d['score'], 4))
        for d in json.loads(path.read_text())
    }


@pytest.fixture(scope='module')
def boxes(project):
    """teacher_boxes of the weak teacher with 1 process (boxes_one) and 2 (the DVC output),
    and the seed's ME table from the latter."""
    one, two = f'data/me/{PAIR}/boxes_one', f'data/me/{PAIR}/boxes'
    name = f'teacher_boxes@{PAIR}'
    assert_one_process(stage(project, name, 'stages/teacher_boxes.py', '--teacher', WEAK, '--out', one, procs=1))
    assert_two_ranks(stage(project, name, 'stages/teacher_boxes.py', '--teacher', WEAK, '--out', two))
    stage(
        project, f'me_table@{PAIR}-{SEED}', 'stages/me_table.py',
        '--ratios', f'{two}/area_ratios.json', '--seed', str(SEED), '--out', ME_TABLE,
    )  # fmt: skip
    return project / one, project / two


def test_teacher_boxes_of_two_processes_equal_one(boxes):
    one, two = boxes
    assert (two / 'area_ratios.json').read_bytes() == (one / 'area_ratios.json').read_bytes()
    ratios = json.loads((two / 'area_ratios.json').read_text())['area_ratios']
    assert len(ratios) == 16 and any(r > 0 for r in ratios.values())  # every training image, boxes found
    predicted = detections(two / 'predictions.bbox.json')
    assert predicted and predicted == detections(one / 'predictions.bbox.json')


def test_no_work_dir_is_left_when_rank_1_finishes_predicting_last(project, boxes):
    """Every rank writes its test-epoch log into the prediction work dir (mmengine's LoggerHook):
    rank 0 removes that dir only once rank 1 is done with it. Rank 1 is made the late one here."""
    assert not list(project.glob('work_dirs/*'))
    name = f'teacher_boxes@{PAIR}'
    out = f'data/me/{PAIR}/boxes_late'
    log = stage(project, name, 'stages/teacher_boxes.py', '--teacher', WEAK, '--out', out, late_rank_1=True)
    assert_two_ranks(log)
    assert '[late_rank_1] rank 1 ends its test epoch 2 s late' in log, log[-3000:]
    assert (project / out / 'area_ratios.json').read_bytes() == (boxes[1] / 'area_ratios.json').read_bytes()
    assert not list(project.glob('work_dirs/*')) and not (project / '.dist_test').exists()


def test_predictions_and_metrics_of_two_processes_equal_one(project):
    assert_one_process(evaluate(project, WEAK, 'one', procs=1))
    assert_two_ranks(evaluate(project, WEAK, 'two'))
    identical = {}
    for split in ('val', 'test'):
        one, two = (project / f'predictions/{tag}/{split}.bbox.json' for tag in ('one', 'two'))
        predicted = detections(two)
        assert predicted and predicted == detections(one)
        images = json.loads((project / f'data/synthetic/annotations/instances_{split}.json').read_text())['images']
        assert {d[0] for d in predicted} <= {im['id'] for im in images}
        identical[split] = one.read_bytes() == two.read_bytes()
    print(f'2-process predictions byte-identical to 1-process: {identical}')
    assert all(identical.values()), identical
    one, two = (json.loads((project / f'metrics/{tag}.json').read_text()) for tag in ('one', 'two'))
    assert one == two and one['test']['mAP'] >= 0


def assert_plain_export(root: Path, run: str, reference: str = 'models/reference') -> None:
    """``run`` exported as a 1-process run exports: plain weights with the same keys, shapes
    and meta keys, a stock config without launcher or DDP wrapper, a loss log; written by
    rank 0 alone, and no work dir left behind."""
    ckpt = torch.load(root / run / 'model.pth', weights_only=True)
    ref = torch.load(root / reference / 'model.pth', weights_only=True)
    assert set(ckpt) == set(ref) == {'state_dict', 'meta'}
    assert set(ckpt['meta']) == set(ref['meta']) and ckpt['meta']['iters'] == ITERS
    state, ref = ckpt['state_dict'], ref['state_dict']
    assert list(state) == list(ref)  # no 'module.' (DDP) or 'student.' (distiller) prefix
    assert all(state[k].shape == ref[k].shape and state[k].dtype == ref[k].dtype for k in state)
    assert {p.name for p in (root / run).iterdir()} >= {'model.pth', 'model.py', 'train.py', 'run.json'}
    for config in ('model.py', 'train.py'):
        text = (root / run / config).read_text()
        assert 'launcher' not in text and 'model_wrapper_cfg' not in text, config
    record = json.loads((root / run / 'run.json').read_text())
    assert record['iters'] == ITERS and record['batch_size'] == 2
    assert not list(root.glob('work_dirs/*'))  # finished: nothing resumable left, on any rank


def test_baseline_trains_on_two_processes_through_dvc_and_exports_the_one_process_format(project):
    name = f'baseline@{STUDENT}-{SEED}'
    out = stage(project, name, '-m', 'dvc', 'repro', '--single-item', name)
    assert_two_ranks(out)
    assert 'world size 2' in out and 'find_unused_parameters=False' in out
    run = f'models/students/{STUDENT}/seed{SEED}/baseline'
    assert_plain_export(project, run)
    csv = (project / f'logs/students/{STUDENT}/seed{SEED}/baseline.csv').read_text().splitlines()
    assert csv[0].startswith('iter,lr,loss') and len(csv) >= 2
    evaluate(project, run, 'baseline', name=f'evaluate_baseline@{STUDENT}-{SEED}')
    metrics = json.loads((project / 'metrics/baseline.json').read_text())
    assert metrics['kind'] == 'baseline' and set(metrics['test']) >= {'mAP'}


def test_me_distillation_on_two_processes(project, boxes):
    """distill_me: ME views in the training pipeline, so a rank's batch may have none: DDP
    runs with find_unused_parameters. (The weak teacher stands in for the strong one.)"""
    method = 'dfmsd_no_sal'
    run = f'models/students/{STUDENT}/seed{SEED}/{PAIR}/{method}'
    out = stage(
        project, f'distill_me@{STUDENT}-{PAIR}-{method}-{SEED}', 'stages/distill.py', '--kind', 'distill_me',
        '--student', STUDENT, '--pair', PAIR, '--method', method, '--seed', str(SEED), '--teacher', WEAK,
        '--init', INIT, '--me-table', ME_TABLE, '--out', run, '--log', f'logs/{method}.csv',
    )  # fmt: skip
    assert_two_ranks(out)
    assert 'world size 2' in out and 'find_unused_parameters=True' in out
    assert_plain_export(project, run)
    record = json.loads((project / run / 'run.json').read_text())
    assert record['uses_me'] and record['views_seen'] > 0
    assert record['images_seen'] == ITERS * 2 * 2  # the global batch: batch_size x 2 processes
    assert 'loss_distill_aug_s8' in (project / f'logs/{method}.csv').read_text().splitlines()[0]
    evaluate(project, run, method, name=f'evaluate_me@{STUDENT}-{PAIR}-{method}-{SEED}')
    assert 'mAP' in json.loads((project / f'metrics/{method}.json').read_text())['test']


# ---------------------------------------------------------------- the ME transform
def me_views(loader) -> dict[int, bytes]:
    views = {}
    for batch in loader:
        for sample in batch['data_samples']:
            view = sample.metainfo.get('me_view')
            if view is not None:
                assert sample.img_id not in views
                views[sample.img_id] = view.tobytes() + str(view.shape).encode()
    return views


def test_me_views_are_the_same_bytes_whatever_the_order_workers_or_rank(tiny_dataset, tmp_path):
    """The training dataloader of an ME config (dfmsd.engine.configs.with_me_views): each
    image's view, read in order, in reverse, through 0 or 2 workers, or split between 2
    ranks by a DistributedSampler, with the global RNGs in other states, is the same bytes."""
    from mmdet.registry import DATASETS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from torch.utils.data import DataLoader, DistributedSampler

    import dfmsd.models  # noqa: F401  (registers MaskingEnhancement)
    from dfmsd.core.io import write_json
    from dfmsd.core.params import ME, Data, Detector, Train
    from dfmsd.data.coco import ground_truth_ratios, load_json
    from dfmsd.data.me import decision_table
    from dfmsd.engine.configs import training_config, with_me_views

    init_default_scope('mmdet')
    data = Data(
        root=str(tiny_dataset),
        generate=False,
        image_size=64,
        splits={s: dict(ann=f'annotations/instances_{s}.json', img=f'{s}/') for s in ('train', 'val', 'test')},
    )
    ratios = ground_truth_ratios(load_json(tiny_dataset / 'annotations/instances_train.json'))
    table = decision_table(ratios, ME(threshold=float(np.median(list(ratios.values()))), noise_prob=0.5), seed=3)
    assert table['counts']['noise'] and table['counts']['crop'] and table['counts']['none'], table['counts']
    write_json(tmp_path / 'me.json', table)
    spec = Detector(config=str(REPO / 'configs/small/retinanet.py'), depth=18, width=8, fpn_channels=16)
    cfg = training_config(spec, data, Train(batch_size=3, iters=2), 2, SEED, f'students.{STUDENT}')
    with_me_views(cfg, str(tmp_path / 'me.json'))

    # Workers come from a forkserver, not a fork of this process: a fork would also inherit the
    # exit hooks of whatever ran here before (Prefect's log and event services, from test_flow,
    # run in a forked child at exit and fail it with exit code 1), so the outcome would depend
    # on the test order. The claim tested is about the views, not about fork.
    workers_from = dict(multiprocessing_context='forkserver')

    def training_loader(workers: int, seed: int):
        loader = dict(cfg.train_dataloader, num_workers=workers, persistent_workers=False)
        return Runner.build_dataloader(dict(loader, **workers_from) if workers else loader, seed=seed)

    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    reference = me_views(training_loader(0, SEED))
    with_view = {int(k) for k, op in table['ops'].items() if op != 'none'}
    assert set(reference) == with_view & {dataset.get_data_info(i)['img_id'] for i in range(len(dataset))}
    np.random.seed(123)
    torch.manual_seed(123)
    reverse = me_views([pseudo_collate([dataset[i]]) for i in reversed(range(len(dataset)))])
    assert reverse == reference
    assert me_views(training_loader(2, seed=7)) == reference  # 2 worker processes, another order
    in_process, two_workers = dict(collate_fn=pseudo_collate), dict(collate_fn=pseudo_collate, num_workers=2)
    ranks = [  # rank 0 in this process, rank 1 through 2 workers
        me_views(DataLoader(dataset, 2, sampler=DistributedSampler(dataset, 2, rank, seed=5), **loader))
        for rank, loader in enumerate([in_process, dict(two_workers, **workers_from)])
    ]
    assert set(ranks[0]) | set(ranks[1]) == set(reference)
    for views in ranks:
        assert views and all(reference[image] == view for image, view in views.items())


# ---------------------------------------------------------------- launcher units
@pytest.mark.fast
def test_launch_settings_and_torchrun_command(monkeypatch):
    from dfmsd.core.errors import ParamsError
    from dfmsd.core.params import Launch, launch_settings
    from dfmsd.engine.launch import torchrun_command, world_size

    for key in [k for k in os.environ if k.startswith('DFMSD_LAUNCH_')]:
        monkeypatch.delenv(key)
    assert world_size(launch_settings(None)) == 1
    given = {'nproc_per_node': 8, 'nnodes': 2, 'node_rank': 0, 'master_addr': '10.0.0.1'}
    monkeypatch.setenv('DFMSD_LAUNCH_NODE_RANK', '1')
    launch = launch_settings(given)
    assert launch.node_rank == 1 and world_size(launch) == 16
    assert launch_settings(Launch(**given)).node_rank == 1
    cmd = torchrun_command(launch, ['stages/distill.py', '--kind', 'distill'])
    assert cmd[1:] == [
        '-m', 'torch.distributed.run', '--nproc_per_node', '8', '--nnodes', '2', '--node_rank', '1',
        '--master_addr', '10.0.0.1', '--master_port', '29500', '--', 'stages/distill.py', '--kind', 'distill',
    ]  # fmt: skip
    monkeypatch.setenv('DFMSD_LAUNCH_NODE_RANK', '-1')
    with pytest.raises(ParamsError, match='node_rank'):
        launch_settings(given)
    monkeypatch.delenv('DFMSD_LAUNCH_NODE_RANK')
    with pytest.raises(ParamsError, match='launch.gpus'):
        launch_settings({'gpus': 2})


@pytest.mark.fast
def test_maybe_relaunch_execs_torchrun_only_for_several_processes_outside_a_worker(monkeypatch):
    from dfmsd.core.params import Launch
    from dfmsd.engine import launch as launch_module

    calls = []
    monkeypatch.setattr(launch_module.os, 'execv', lambda path, argv: calls.append(argv))
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    launch_module.maybe_relaunch(Launch(nproc_per_node=1), ['stages/evaluate.py'])
    assert calls == []
    launch_module.maybe_relaunch(Launch(nproc_per_node=2, backend='gloo'), ['stages/evaluate.py', '--model', 'm'])
    assert calls and calls[0][:3] == [sys.executable, '-m', 'torch.distributed.run']
    assert calls[0][-3:] == ['stages/evaluate.py', '--model', 'm']
    monkeypatch.setenv('LOCAL_RANK', '0')
    launch_module.maybe_relaunch(Launch(nproc_per_node=2, backend='gloo'), ['stages/evaluate.py'])
    assert len(calls) == 1  # a torchrun worker runs the stage itself


def test_apply_launcher_only_in_workers(monkeypatch):
    import torch.distributed as dist
    from mmengine.config import Config

    from dfmsd.core.errors import ParamsError
    from dfmsd.core.params import Launch
    from dfmsd.engine.launch import apply_launcher, single_process_config

    me_cfg = dict(
        model=dict(type='StageDistiller', aug_loss_weight=1.0),
        train_dataloader=dict(dataset=dict(pipeline=[dict(type='LoadImageFromFile'), dict(type='MaskingEnhancement')])),
        env_cfg=dict(cudnn_benchmark=False),
    )
    gloo = Launch(nproc_per_node=2, backend='gloo')
    cfg = Config(me_cfg)
    monkeypatch.delenv('LOCAL_RANK', raising=False)
    assert not apply_launcher(cfg, gloo)
    assert 'launcher' not in cfg and 'model_wrapper_cfg' not in cfg

    # a one-process "worker": on a CPU, apply_launcher starts the gloo process group itself
    worker = dict(LOCAL_RANK='0', RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    for key, value in worker.items():
        monkeypatch.setenv(key, value)
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    try:
        assert apply_launcher(cfg, Launch(nproc_per_node=2, backend=backend))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert cfg.launcher == 'pytorch' and cfg.env_cfg == dict(cudnn_benchmark=False, dist_cfg=dict(backend=backend))
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
    assert cfg.model_wrapper_cfg.find_unused_parameters is True  # ME: some batches have no view
    assert me_cfg['env_cfg'] == dict(cudnn_benchmark=False)  # the given dicts are not modified
    plain = single_process_config(cfg)
    assert 'launcher' not in plain and 'model_wrapper_cfg' not in plain and cfg.launcher == 'pytorch'
    if not torch.cuda.is_available():
        assert cfg.model_wrapper_cfg.device_ids is None
        with pytest.raises(ParamsError, match='nccl'):
            apply_launcher(Config(me_cfg), Launch(nproc_per_node=2, backend='nccl'))
