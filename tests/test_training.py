"""Training runs through mmengine's Runner, as the stages run them (dfmsd.engine.students):
SAL stage 2 continues stage 1, ME in the last stage adds views to it, interrupted runs resume
bit-identically, diverging runs stop, zero-weight distillation is plain training, and the
exported student is a stock MMDetection model.

Tiny on purpose: 64 px images, ResNet-18 of width 8 with 16-channel FPNs, batch 2, a few
iterations. The teachers have random weights: what is tested is the machinery, not accuracy.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import mmdet
import pytest
import torch
from mmdet.registry import MODELS
from mmengine.logging import MessageHub
from mmengine.registry import init_default_scope
from support import REPO, env, small, tiny_data

import dfmsd.models  # noqa: F401  (registers the distiller, losses, transform, hooks, loop)
from dfmsd.core.errors import TrainingDiverged
from dfmsd.core.io import TEACHER_MEMO_ENV, read_json, write_json
from dfmsd.core.kinds import run_kind
from dfmsd.core.params import ME, Data, Distill, Launch, Method, Runtime, SALMethod, Train
from dfmsd.data.coco import dataset_classes, load_json
from dfmsd.data.me import decision_table
from dfmsd.engine import training
from dfmsd.engine.checkpoint import export_plain_checkpoint, latest_verified_checkpoint, load_verified, load_weights
from dfmsd.engine.configs import detector_config
from dfmsd.engine.students import distill_student, init_student, sal_boundary, train_baseline
from dfmsd.engine.training import collect_scalars
from dfmsd.evaluation import coco_metrics, predict_splits
from dfmsd.models.distiller import StageDistiller
from dfmsd.models.loops import StagedIterBasedTrainLoop

init_default_scope('mmdet')
STUDENT = small('retinanet')
#: SAL: stage 1 is iterations 1-4, stage 2 iterations 5-8; checkpoints every 2 iterations
SAL_TRAIN = Train(batch_size=2, iters=8, checkpoint_interval=2, lr=1e-3, warmup_iters=2)
DFMSD = SALMethod(
    label='DFMSD',
    losses={
        'stage': dict(type='DMKDLoss', loss_weight=4e-3, reduction='mean'),
        'sfa': dict(type='PKDLoss', loss_weight=0.25),
    },
    aug_loss_weight=2e-3,
    me_stages=[2],
    split=0.5,
)
MGD = Method(label='MGD', losses={'feature': dict(type='MGDLoss', loss_weight=1e-3)})
DMKD = Method(label='DMKD', losses={'feature': dict(type='DMKDLoss', loss_weight=1e-3)})


def export_teacher(out: Path, data: Data, detector: str, seed: int) -> Path:
    """A random-weight teacher as the teacher stages leave it: ``model.pth`` + ``model.py``."""
    cfg = detector_config(small(detector), data, 'teacher')
    torch.manual_seed(seed)
    model = MODELS.build(cfg.model)
    model.init_weights()
    classes = list(dataset_classes(Path(data.root) / data.splits['train'].ann))
    export_plain_checkpoint(model.state_dict(), out / 'model.pth', meta={'dataset_meta': {'classes': classes}})
    cfg.dump(str(out / 'model.py'))
    return out


@dataclass
class World:
    """Inputs shared by the runs of this module; each run writes only under its own cwd."""

    data: Data
    weak: Path
    strong: Path
    init: Path
    me_table: Path
    ops: dict[int, str] = field(default_factory=dict)


@pytest.fixture(scope='module')
def world(_tiny_dataset_master, tmp_path_factory) -> World:
    """A copy of conftest's tiny dataset (``tiny_dataset`` is per test; these inputs are made once
    for the module), two random teachers, the student's seed-0 initialisation, an ME table."""
    root = tmp_path_factory.mktemp('world')
    data = tiny_data(shutil.copytree(_tiny_dataset_master, root / 'synthetic'))
    ids = [im['id'] for im in load_json(root / 'synthetic' / data.splits['train'].ann)['images']]
    # made-up r(I): every third image 'large' (crop), the others 'small' (noise or nothing)
    settings = ME(threshold=0.5, noise_prob=0.5, noise_sigma=25.0, crop_min=0.1, crop_max=0.3)
    table = decision_table({i: 0.9 if i % 3 == 0 else 0.1 for i in ids}, settings, seed=3)
    assert all(table['counts'][op] for op in ('noise', 'crop', 'none')), table['counts']
    write_json(root / 'me.json', table)
    init_student(STUDENT, data, 0, root / 'init', 'students.retinanet')
    return World(
        data=data,
        weak=export_teacher(root / 'weak', data, 'retinanet', seed=1),
        strong=export_teacher(root / 'strong', data, 'gfl', seed=2),
        init=root / 'init',
        me_table=root / 'me.json',
        ops={int(k): v for k, v in table['ops'].items()},
    )


@pytest.fixture(autouse=True)
def _torch_threads():
    """Runs set torch's thread count (runtime.threads); give the next test its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def distill(
    world: World,
    mp: pytest.MonkeyPatch,
    stage: str,
    *,
    kind: str = 'distill',
    method: Method = MGD,
    train: Train = SAL_TRAIN,
    teacher: Path | None = None,
    init: Path | None = None,
) -> Path:
    """One run of the distill stage command's code, in the current directory; returns its model dir."""
    mp.setenv('DVC_STAGE', stage)
    name = stage.replace('@', '-')
    out = Path.cwd() / 'models' / name
    distill_student(
        kind=run_kind(kind),
        method=method,
        student=STUDENT,
        data=world.data,
        train=train,
        distill=Distill(min_cells=2),
        runtime=Runtime(threads=1),
        launch=Launch(),
        seed=0,
        teacher=str(teacher or world.strong),
        init=str(init or world.init),
        me_table=str(world.me_table) if kind in ('sal1', 'sal2', 'distill_me') else None,
        out=str(out),
        loss_log=str(Path.cwd() / 'logs' / f'{name}.csv'),
        identity={'student': 'retinanet', 'pair': 'p', 'method': method.label, 'seed': 0},
    )
    return out


def loss_rows(model_dir: Path) -> list[dict[str, str]]:
    log = model_dir.parent.parent / 'logs' / f'{model_dir.name}.csv'
    with open(log, newline='') as f:
        return list(csv.DictReader(f))


def work_dir_of(stage: str) -> Path:
    (found,) = Path('work_dirs').glob(f'{stage.replace("@", "-")}-*')
    return found


def adam_steps(checkpoint: dict) -> dict[int, int]:
    return {i: int(s['step']) for i, s in checkpoint['optimizer']['state'].items()}


class Interrupted(Exception):
    """Stands in for a process killed mid-run."""


@contextlib.contextmanager
def iterations(mp: pytest.MonkeyPatch, stop_after: int | None = None):
    """Count the iterations the loop runs; with ``stop_after``, die after that iteration."""
    ran: list[int] = []
    original = StagedIterBasedTrainLoop.run_iter

    def run_iter(self, data_batch):
        original(self, data_batch)
        ran.append(self.iter)
        if stop_after is not None and self.iter >= stop_after:
            raise Interrupted(f'killed after iteration {self.iter}')

    with mp.context() as m:
        m.setattr(StagedIterBasedTrainLoop, 'run_iter', run_iter)
        yield ran


@dataclass
class Seen:
    """What the distiller saw during a run (recorded around StageDistiller.loss)."""

    first_iter: int | None = None
    loss_modules: dict[str, torch.Tensor] | None = None  # at the first iteration, before its step
    param_names: list[str] = field(default_factory=list)
    batches: list[dict] = field(default_factory=list)
    stage_batch: list[int] = field(default_factory=list)  # N of every stage-loss call


@contextlib.contextmanager
def watch_distiller(mp: pytest.MonkeyPatch):
    seen = Seen()
    original = StageDistiller.loss

    def loss(self, inputs, data_samples):
        if seen.loss_modules is None:
            seen.first_iter = MessageHub.get_current_instance().get_info('iter')
            seen.loss_modules = {k: v.detach().clone() for k, v in self.losses.state_dict().items()}
            seen.param_names = [n for n, _ in self.named_parameters()]
            for module in self.losses['stage']:
                module.register_forward_hook(lambda m, args, out: seen.stage_batch.append(args[0].shape[0]))
        out = original(self, inputs, data_samples)
        seen.batches.append(
            {
                'ids': [int(s.img_id) for s in data_samples],
                'views': ['me_view' in s.metainfo for s in data_samples],
                'keys': sorted(out),
            }
        )
        return out

    with mp.context() as m:
        m.setattr(StageDistiller, 'loss', loss)
        yield seen


def keeping_final(finals: list):
    """training.export, which first appends the final checkpoint it exports to ``finals``."""
    export = training.export

    def wrapped(final, work_dir, **kwargs):
        finals.append(load_verified(final))
        return export(final, work_dir, **kwargs)

    return wrapped


# ---------------------------------------------------------------- SAL, shared by several tests
@pytest.fixture(scope='module')
def sal(world, tmp_path_factory):
    """SAL stage 1, one uninterrupted schedule for reference, and stage 2 with the loss modules
    carried over or reset. Stage 2's final checkpoint (the resumable state, optimizer included)
    is read as the stage exports it, before its work dir goes."""
    root = tmp_path_factory.mktemp('sal')
    out = SimpleNamespace(root=root, boundary=sal_boundary(DFMSD, SAL_TRAIN.iters))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        out.sal1 = distill(world, mp, 'sal1@dfmsd', kind='sal1', method=DFMSD, teacher=world.weak)
        out.reference = distill(world, mp, 'distill@reference', method=DFMSD)
        for reset in (False, True):
            method = DFMSD.model_copy(update={'reset_modules': reset})
            stage = f'sal2@{"reset" if reset else "carry"}'
            finals = []
            with watch_distiller(mp) as seen, pytest.MonkeyPatch.context() as keep:
                keep.setattr(training, 'export', keeping_final(finals))
                model_dir = distill(world, mp, stage, kind='sal2', method=method, init=out.sal1)
            setattr(out, 'reset' if reset else 'carry', SimpleNamespace(dir=model_dir, seen=seen, final=finals[0]))
    return out


def test_sal_stage2_continues_the_learning_rate_schedule(sal):
    boundary, iters = sal.boundary, SAL_TRAIN.iters
    reference = {int(r['iter']): r['lr'] for r in loss_rows(sal.reference)}
    stage1 = {int(r['iter']): r['lr'] for r in loss_rows(sal.sal1)}
    assert sorted(reference) == list(range(1, iters + 1)) and sorted(stage1) == list(range(1, boundary + 1))
    assert len(set(reference.values())) > 2  # warm-up then cosine: a restart would show
    assert stage1 == {i: reference[i] for i in stage1}
    for run in (sal.carry, sal.reset):
        stage2 = {int(r['iter']): r['lr'] for r in loss_rows(run.dir)}
        assert min(stage2) == boundary + 1 and run.seen.first_iter == boundary
        assert stage2 == {i: reference[i] for i in range(boundary + 1, iters + 1)}


def test_sal_stage2_carries_the_optimizer_state(sal):
    boundary, iters = sal.boundary, SAL_TRAIN.iters
    state = load_verified(sal.sal1 / 'state.pth')
    assert set(adam_steps(state).values()) == {boundary}
    names = sal.carry.seen.param_names
    carried = adam_steps(sal.carry.final)
    assert len(carried) == len(names) and set(carried.values()) == {iters}
    # reset_modules: the loss modules' Adam state starts again, the student's goes on
    reset = adam_steps(sal.reset.final)
    for i, name in enumerate(sal.reset.seen.param_names):
        assert reset[i] == (iters - boundary if name.startswith('losses.') else iters), name


def test_sal_loss_modules_are_carried_over_or_reset(sal):
    stage1 = {
        k[len('losses.') :]: v
        for k, v in load_verified(sal.sal1 / 'state.pth')['state_dict'].items()
        if k.startswith('losses.')
    }
    assert stage1 and sal.carry.seen.loss_modules.keys() == stage1.keys()
    assert all(torch.equal(sal.carry.seen.loss_modules[k], v) for k, v in stage1.items())
    same = [k for k, v in stage1.items() if torch.equal(sal.reset.seen.loss_modules[k], v)]
    assert not same, f'not re-initialised at the switch: {same}'


def test_sal_run_records_add_up_over_both_stages(sal):
    batch, boundary, iters = SAL_TRAIN.batch_size, sal.boundary, SAL_TRAIN.iters
    stage1 = read_json(sal.sal1 / 'run.json')
    assert (stage1['iters'], stage1['start_iter'], stage1['images_seen']) == (boundary, 0, boundary * batch)
    assert stage1['views_seen'] == 0 and stage1['teacher_images'] == stage1['images_seen']
    for run in (sal.carry, sal.reset):
        stage2 = read_json(run.dir / 'run.json')
        assert (stage2['iters'], stage2['start_iter']) == (iters, boundary)
        assert stage2['images_seen'] == stage1['images_seen'] + (iters - boundary) * batch == iters * batch
        assert stage2['teacher_images'] == stage1['teacher_images'] + (iters - boundary) * batch + stage2['views_seen']
        assert stage2['strides'] == [8, 16, 32] and stage2['uses_me'] and not stage1['uses_me']
    assert not (sal.carry.dir / 'state.pth').exists() and (sal.sal1 / 'state.pth').is_file()


def test_a_doubled_sal_budget_gives_each_stage_the_whole_schedule_and_stage1_its_own_alpha(
    world, tmp_path, monkeypatch
):
    """The paper's SAL protocol (``budget: 2``, ``split: 0.5``): stage 1 alone runs train.iters
    iterations of a schedule twice as long; ``stage1_losses`` weigh stage 1's terms (alpha per stage)."""
    stage1 = {
        'stage': dict(type='DMKDLoss', loss_weight=0.0, reduction='mean'),
        'sfa': dict(type='PKDLoss', loss_weight=0.5),
    }
    method = DFMSD.model_copy(update={'budget': 2.0, 'stage1_losses': SALMethod(label='x', losses=stage1).losses})
    assert sal_boundary(method, method.iters(SAL_TRAIN.iters)) == SAL_TRAIN.iters
    monkeypatch.chdir(tmp_path)
    with iterations(monkeypatch) as ran:
        model_dir = distill(world, monkeypatch, 'sal1@doubled', kind='sal1', method=method, teacher=world.weak)
    assert ran == list(range(1, SAL_TRAIN.iters + 1))
    record = read_json(model_dir / 'run.json')
    assert (record['iters'], record['start_iter']) == (SAL_TRAIN.iters, 0)
    rows = loss_rows(model_dir)
    stage = [k for k in rows[0] if k.startswith('loss_distill_stage_s')]
    sfa = [k for k in rows[0] if k.startswith('loss_distill_sfa_s')]
    assert stage and sfa, list(rows[0])
    assert all(float(r[k]) == 0.0 for r in rows for k in stage), "stage 1 ran with stage 2's alpha"
    assert all(float(r[k]) > 0.0 for r in rows for k in sfa)
    # the learning rate follows the doubled schedule: still near its peak where the 8-iteration one has decayed
    reference = {
        int(r['iter']): float(r['lr']) for r in loss_rows(distill(world, monkeypatch, 'distill@plain8', method=DFMSD))
    }
    doubled = {int(r['iter']): float(r['lr']) for r in rows}
    assert doubled[SAL_TRAIN.iters] > reference[SAL_TRAIN.iters]


def test_sal_stage1_rerun_writes_the_same_bytes(sal, world, tmp_path, monkeypatch):
    """Stage 1's outputs, the resumable training state included, are a DVC-cached output: a
    rerun elsewhere, at another time, must write the same bytes (no clock, eta or paths)."""
    monkeypatch.chdir(tmp_path)
    again = distill(world, monkeypatch, 'sal1@dfmsd', kind='sal1', method=DFMSD, teacher=world.weak)
    files = sorted(p.name for p in sal.sal1.iterdir())
    assert 'state.pth' in files and files == sorted(p.name for p in again.iterdir())
    differ = [name for name in files if (sal.sal1 / name).read_bytes() != (again / name).read_bytes()]
    assert not differ, differ
    meta = load_verified(again / 'state.pth')['meta']
    assert 'time' not in meta and 'mmengine_version' not in meta and meta['iter'] == sal.boundary


def test_me_in_the_last_stage_adds_views_to_every_original(sal, world):
    batch, boundary, iters = SAL_TRAIN.batch_size, sal.boundary, SAL_TRAIN.iters
    seen = sal.carry.seen
    assert len(seen.batches) == iters - boundary
    # every original gets the stage terms: each level's stage loss sees the whole batch
    assert seen.stage_batch == [batch] * (iters - boundary) * 3
    views = 0
    for b in seen.batches:
        assert len(b['ids']) == batch
        assert b['views'] == [world.ops[i] != 'none' for i in b['ids']], b
        assert {k for k in b['keys'] if k.startswith('loss_distill_stage')} == {
            f'loss_distill_stage_s{s}' for s in (8, 16, 32)
        }
        assert any(k.startswith('loss_distill_aug') for k in b['keys']) == any(b['views'])
        views += sum(b['views'])
    ops_seen = {world.ops[i] for b in seen.batches for i in b['ids']}
    assert views and 'none' in ops_seen, f'this draw exercises too little: {seen.batches}'
    record = read_json(sal.carry.dir / 'run.json')
    assert record['images_seen'] == iters * batch
    assert record['views_seen'] == views
    assert record['teacher_images'] == iters * batch + views


# ---------------------------------------------------------------- bit-exact resume
@pytest.mark.parametrize('method', [MGD, DMKD], ids=['mgd', 'dmkd'])
def test_interrupted_run_resumes_bit_identically(world, tmp_path, monkeypatch, method):
    monkeypatch.chdir(tmp_path)
    train = Train(batch_size=2, iters=6, checkpoint_interval=3, lr=1e-3, warmup_iters=2)
    first = distill(world, monkeypatch, 'distill@first', method=method, train=train)
    second = distill(world, monkeypatch, 'distill@second', method=method, train=train)
    with iterations(monkeypatch, stop_after=5), pytest.raises(Interrupted):
        distill(world, monkeypatch, 'distill@resumed', method=method, train=train)
    assert latest_verified_checkpoint(work_dir_of('distill@resumed')).name == 'iter_3.pth'
    assert not (tmp_path / 'models' / 'distill-resumed').exists()
    with iterations(monkeypatch) as ran:
        resumed = distill(world, monkeypatch, 'distill@resumed', method=method, train=train)
    assert ran == [4, 5, 6]
    reference = (first / 'model.pth').read_bytes()
    assert (second / 'model.pth').read_bytes() == reference, 'two uninterrupted runs differ'
    assert (resumed / 'model.pth').read_bytes() == reference, 'the resumed run differs'
    assert loss_rows(resumed) == loss_rows(first)


def test_interrupted_sal_stage2_resumes_bit_identically(sal, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with iterations(monkeypatch, stop_after=7), pytest.raises(Interrupted):
        distill(world, monkeypatch, 'sal2@carry', kind='sal2', method=DFMSD, init=sal.sal1)
    assert latest_verified_checkpoint(work_dir_of('sal2@carry')).name == 'iter_6.pth'
    with iterations(monkeypatch) as ran:
        resumed = distill(world, monkeypatch, 'sal2@carry', kind='sal2', method=DFMSD, init=sal.sal1)
    assert ran == [7, 8]
    assert (resumed / 'model.pth').read_bytes() == (sal.carry.dir / 'model.pth').read_bytes()
    assert read_json(resumed / 'run.json') == read_json(sal.carry.dir / 'run.json')


def test_a_row_reading_the_teacher_memo_writes_the_bytes_it_writes_without_it(world, tmp_path, monkeypatch):
    """The flow run's teacher-feature memo (dfmsd.models.teacher_memo): a row that reads the
    strong teacher's features another row stored computes none of them and ends byte-identical
    to the same row run without a memo; another teacher's features are its own entries."""
    monkeypatch.chdir(tmp_path)
    alone = distill(world, monkeypatch, 'distill@alone', method=DMKD)
    memo = tmp_path / 'memo'
    monkeypatch.setenv(TEACHER_MEMO_ENV, str(memo))
    distill(world, monkeypatch, 'distill@filler', method=MGD)
    filled = sorted(memo.rglob('*.pt'))
    assert 0 < len(filled) <= SAL_TRAIN.iters  # one per distinct batch
    shared = distill(world, monkeypatch, 'distill@shared', method=DMKD)
    assert sorted(memo.rglob('*.pt')) == filled, 'the second row computed features the memo had'
    files = sorted(p.name for p in alone.iterdir())
    assert files == sorted(p.name for p in shared.iterdir())
    assert [name for name in files if (alone / name).read_bytes() != (shared / name).read_bytes()] == []
    assert loss_rows(shared) == loss_rows(alone)
    distill(world, monkeypatch, 'sal1@weak', kind='sal1', method=DFMSD, teacher=world.weak)
    assert len(list(memo.rglob('*.pt'))) > len(filled), "the weak teacher was given the strong one's features"


# ---------------------------------------------------------------- divergence and loss scale
def _finite(value) -> bool:
    return value is not None and abs(float(value)) < float('inf')


@pytest.mark.parametrize('cause', ['huge_weight', 'nan_teacher'])
def test_diverging_run_stops_with_a_clear_error_and_exports_nothing(world, tmp_path, monkeypatch, capfd, cause):
    monkeypatch.chdir(tmp_path)
    teacher = world.strong
    method = MGD
    if cause == 'huge_weight':
        method = Method(label='MGD', losses={'feature': dict(type='MGDLoss', loss_weight=1e30)})
    else:  # a teacher whose weights hold a NaN
        teacher = tmp_path / 'nan_teacher'
        checkpoint = load_weights(world.strong / 'model.pth')
        checkpoint['state_dict']['neck.fpn_convs.0.conv.weight'][0, 0, 0, 0] = float('nan')
        export_plain_checkpoint(checkpoint['state_dict'], teacher / 'model.pth', meta=checkpoint['meta'])
        shutil.copyfile(world.strong / 'model.py', teacher / 'model.py')
    train = Train(batch_size=2, iters=8, checkpoint_interval=8, lr=1e-3, warmup_iters=2)
    with pytest.raises(TrainingDiverged) as err:
        distill(world, monkeypatch, 'distill@diverged', method=method, train=train, teacher=teacher)
    message = str(err.value)
    stopped = int(re.search(r'last: iteration (\d+)', message).group(1))
    assert 'not finite for 3 consecutive iterations' in message
    assert 'lower the loss weights or the learning rate' in message
    rows = collect_scalars(work_dir_of('distill@diverged'))
    assert [r['iter'] for r in rows] == list(range(1, stopped + 1))  # it stopped at once
    bad = [not (_finite(r['loss']) and (r.get('grad_norm') is None or _finite(r['grad_norm']))) for r in rows]
    assert bad[-3:] == [True] * 3 and stopped < train.iters
    if cause == 'nan_teacher':
        assert stopped == 3  # non-finite from the first iteration
    assert not (tmp_path / 'models' / 'distill-diverged').exists()
    if cause == 'huge_weight':
        assert 'the distillation terms are' in ''.join(capfd.readouterr())


@pytest.mark.parametrize(('weight', 'loud'), [(3.0, True), (1e-4, False)])
def test_loss_scale_check_warns_only_at_a_mis_scaled_weight(world, tmp_path, monkeypatch, capfd, weight, loud):
    monkeypatch.chdir(tmp_path)
    method = Method(label='MGD', losses={'feature': dict(type='MGDLoss', loss_weight=weight)})
    train = Train(batch_size=2, iters=2, checkpoint_interval=2, lr=1e-3)
    out = distill(world, monkeypatch, 'distill@scale', method=method, train=train)
    first = loss_rows(out)[0]
    distill_terms = sum(float(v) for k, v in first.items() if k.startswith('loss_distill'))
    detection = sum(float(v) for k, v in first.items() if k.startswith('loss_') and not k.startswith('loss_distill'))
    ratio = distill_terms / detection
    assert (ratio > 100) == loud, ratio  # the weights really are (mis)scaled as the case says
    output = ''.join(capfd.readouterr())
    warnings = re.findall(r'the distillation terms are ([\d.e+]+)x the detection loss at iteration (\d+)', output)
    if loud:
        assert len(warnings) == 1 and warnings[0][1] == '1', output[-3000:]
        assert float(warnings[0][0]) == pytest.approx(ratio, rel=1e-2)
    else:
        assert not warnings and 'WARNING: the distillation' not in output


# ---------------------------------------------------------------- zero weight = plain training
def test_zero_weight_distillation_trains_the_student_like_plain_training(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = Train(batch_size=2, iters=3, checkpoint_interval=3, lr=1e-3)
    monkeypatch.setenv('DVC_STAGE', 'baseline@retinanet')
    train_baseline(
        STUDENT,
        world.data,
        train,
        Runtime(threads=1),
        Launch(),
        seed=0,
        init=str(world.init),
        out=str(tmp_path / 'baseline'),
        loss_log=str(tmp_path / 'baseline.csv'),
        identity={'student': 'retinanet', 'seed': 0},
    )
    zero = Method(label='MGD', losses={'feature': dict(type='MGDLoss', loss_weight=0.0)})
    distilled = distill(world, monkeypatch, 'distill@zero', method=zero, train=train)
    plain = load_weights(tmp_path / 'baseline' / 'model.pth')['state_dict']
    student = load_weights(distilled / 'model.pth')['state_dict']
    init = load_weights(world.init / 'model.pth')['state_dict']
    assert student.keys() == plain.keys() == init.keys()
    differ = [k for k in plain if not torch.equal(plain[k], student[k])]
    assert not differ, f'zero-weight distillation changed {differ[:5]}'
    assert any('running_mean' in k for k in plain)  # BN statistics compared too
    trained = [k for k in plain if not torch.equal(plain[k], init[k])]
    assert any('running_var' in k for k in trained) and any(k.endswith('conv.weight') for k in trained)

    # the baseline's training config names the project's loop and hooks: it loads with custom_imports
    built = _last_json(
        _python(TRAIN_CONFIG, tmp_path / 'baseline' / 'train.py', tmp_path / 'rerun', cwd=tmp_path, project=True)
    )
    assert built['custom_imports'] == {'imports': ['dfmsd.models'], 'allow_failed_imports': False}
    assert built['model'] == 'RetinaNet' and built['loop'] == 'StagedIterBasedTrainLoop'
    assert 'DivergenceGuard' in built['hooks']


# ---------------------------------------------------------------- stock MMDetection
STOCK_LOAD = """
import json, sys
sys.modules['dfmsd'] = None  # no project code: importing it fails
from mmdet.apis import init_detector
model = init_detector(sys.argv[1], sys.argv[2], device='cpu')
project = sorted(m for m in sys.modules if m.startswith('dfmsd') and sys.modules[m] is not None)
print(json.dumps({'classes': list(model.dataset_meta['classes']), 'type': type(model).__name__,
                  'project': project, 'path': sys.path}))
"""
STOCK_TOOL = """
import runpy, sys
import torch
torch.set_num_threads(1)  # as our predictions run (runtime.threads): the same float sums
sys.modules['dfmsd'] = None  # no project code: importing it fails
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""
TRAIN_CONFIG = """
import json, sys
from mmengine.config import Config
from mmengine.runner import Runner
cfg = Config.fromfile(sys.argv[1])
cfg.work_dir = sys.argv[2]
runner = Runner.from_cfg(cfg)
print(json.dumps({'keys': sorted(Config.fromfile(sys.argv[1])), 'custom_imports': cfg.custom_imports,
                  'model': type(runner.model).__name__, 'loop': type(runner.train_loop).__name__,
                  'hooks': [type(h).__name__ for h in runner.hooks]}))
"""


def _stock_env() -> dict[str, str]:
    out = env()
    out.pop('PYTHONPATH', None)
    return out


def _python(code: str, *args, cwd: Path, project: bool = False) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, '-c', code, *map(str, args)],
        cwd=cwd,
        env=env(PYTHONPATH=str(REPO)) if project else _stock_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, f'{res.stderr[-4000:]}\n{res.stdout[-2000:]}'
    return res


def _last_json(res: subprocess.CompletedProcess) -> dict:
    """The JSON line the script prints last (mmengine logs lines of its own before it)."""
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_exported_student_is_a_stock_mmdet_model(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = Train(batch_size=2, iters=4, checkpoint_interval=4, lr=1e-3)
    model_dir = distill(world, monkeypatch, 'distill@stock', method=MGD, train=train)
    elsewhere = tmp_path / 'elsewhere'  # not the repository: no project code on sys.path
    elsewhere.mkdir()
    classes = list(dataset_classes(Path(world.data.root) / world.data.splits['train'].ann))
    assert len(classes) == 5

    loaded = _last_json(_python(STOCK_LOAD, model_dir / 'model.py', model_dir / 'model.pth', cwd=elsewhere))
    assert loaded['classes'] == classes and loaded['type'] == 'RetinaNet'
    assert loaded['project'] == [] and str(REPO) not in loaded['path']

    # mmdet's own test tool on the test split, against our predictions and metrics
    root = Path(world.data.root)
    split = world.data.splits['test']
    tool = Path(mmdet.__file__).parent / '.mim' / 'tools' / 'test.py'
    res = _python(
        STOCK_TOOL,
        tool,
        model_dir / 'model.py',
        model_dir / 'model.pth',
        '--work-dir',
        tmp_path / 'mmdet_test',
        '--cfg-options',
        f'test_dataloader.dataset.data_root={root}/',
        f'test_dataloader.dataset.ann_file={split.ann}',
        f'test_dataloader.dataset.data_prefix.img={split.img}',
        f'test_evaluator.ann_file={root / split.ann}',
        f'test_evaluator.outfile_prefix={tmp_path / "mmdet_test" / "mmdet"}',
        'model.test_cfg.score_thr=0.0',
        cwd=elsewhere,
    )
    stock_map = float(re.search(r'coco/bbox_mAP: ([\d.]+)', res.stdout + res.stderr).group(1))
    ours_dir = tmp_path / 'predictions'
    predict_splits(model_dir, {'test': split}, ours_dir, data_root=str(root), score_thr=0.0, threads=1, launch=Launch())
    ours_json = ours_dir / 'test.bbox.json'
    stock_json = tmp_path / 'mmdet_test' / 'mmdet.bbox.json'
    ours = coco_metrics(root / split.ann, ours_json)
    assert json.loads(ours_json.read_text()), 'no detections: the comparison would say nothing'
    assert json.loads(stock_json.read_text()) == json.loads(ours_json.read_text())
    assert coco_metrics(root / split.ann, stock_json) == ours
    assert ours['mAP'] > 0
    assert abs(stock_map - ours['mAP'] / 100) <= 1e-3 + 1e-9, (stock_map, ours['mAP'])  # mmdet logs 3 decimals

    # the training config: complete, loadable with custom_imports, as mmdet's tools/train.py takes it
    built = _last_json(_python(TRAIN_CONFIG, model_dir / 'train.py', tmp_path / 'rerun', cwd=elsewhere, project=True))
    assert built['custom_imports'] == {'imports': ['dfmsd.models'], 'allow_failed_imports': False}
    assert not {'work_dir', 'resume', 'load_from'} & set(built['keys'])
    assert built['model'] == 'StageDistiller' and built['loop'] == 'StagedIterBasedTrainLoop'
    assert {'CheckpointHook', 'DivergenceGuard', 'LossScaleCheck'} <= set(built['hooks'])
    assert {'model.pth', 'model.py', 'run.json', 'train.py'} <= set(os.listdir(model_dir))
