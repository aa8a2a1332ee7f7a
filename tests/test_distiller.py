"""StageDistiller on its own: the hidden teacher follows the model and stays frozen, the stage and
ME terms share one normalisation, levels are matched by stride, each loss gets the inputs its
forward names, the ME transform makes the reference pixels, and damaged checkpoints fail with a
message that says what to do."""

from __future__ import annotations

import os
import re
from pathlib import Path

import mmcv
import numpy as np
import pytest
import torch
from mmdet.registry import DATASETS, MODELS, TRANSFORMS
from mmengine.dataset import pseudo_collate
from mmengine.logging import MessageHub
from mmengine.model import BaseDataPreprocessor
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import CheckpointLoader
from support import REPO, SIZE, small, tiny_data

import dfmsd.models  # noqa: F401  (registers the distiller, losses, transform)
from dfmsd.core.errors import CheckpointError
from dfmsd.core.io import write_json
from dfmsd.core.params import ME, Data, Train, load_params
from dfmsd.data.coco import load_json
from dfmsd.data.me import OPS, decision_table, write_views
from dfmsd.engine.checkpoint import (
    VERIFIED_SCHEME,
    export_plain_checkpoint,
    load_verified,
    record_hash,
    register_verified_checkpoints,
)
from dfmsd.engine.configs import detector_config, training_config, with_me_views
from dfmsd.engine.training import run_training
from dfmsd.models.distiller import StageDistiller, draw_seed
from dfmsd.models.losses import DistillLoss

init_default_scope('mmdet')


def build(data: Data, tmp_path: Path, *, teacher: str = 'faster_rcnn', checkpoint=None, **kwargs) -> StageDistiller:
    """A distiller around a small RetinaNet student; the teacher from a dumped config (random
    weights unless ``checkpoint``)."""
    teacher_py = tmp_path / f'{teacher}.py'
    detector_config(small(teacher), data, 'teacher').dump(str(teacher_py))
    kwargs.setdefault('losses', {'feature': dict(type='MGDLoss', loss_weight=1e-3)})
    torch.manual_seed(0)
    model = StageDistiller(
        student=detector_config(small('retinanet'), data, 'student').model,
        teacher=dict(config=str(teacher_py), checkpoint=checkpoint),
        probe_size=SIZE,
        **kwargs,
    )
    model.init_weights()
    return model


def train_dataset(data: Data, me_table: Path | None = None):
    cfg = detector_config(small('retinanet'), data, 'student')
    if me_table is not None:
        with_me_views(cfg, str(me_table))
    return DATASETS.build(cfg.train_dataloader.dataset)


def a_batch(data: Data, n: int = 2, me_table: Path | None = None) -> dict:
    dataset = train_dataset(data, me_table)
    return pseudo_collate([dataset[i] for i in range(n)])


def me_table(data: Data, path: Path, *, noise_prob: float, seed: int = 3) -> tuple[Path, dict]:
    """A decision table on made-up area ratios: every third image 'large' (crop), the others
    'small' (noise with probability noise_prob)."""
    ids = [im['id'] for im in load_json(Path(data.root) / data.splits['train'].ann)['images']]
    ratios = {i: 0.9 if i % 3 == 0 else 0.1 for i in ids}
    settings = ME(threshold=0.5, noise_prob=noise_prob, noise_sigma=25.0, crop_min=0.1, crop_max=0.3)
    table = decision_table(ratios, settings, seed=seed)
    write_json(path, table)
    return path, table


@pytest.fixture
def hub(request):
    """A message hub of this test's own (the distiller reads the iteration from the current one)."""
    return MessageHub.get_instance(f'hub:{request.node.nodeid}')


# ---------------------------------------------------------------- the hidden teacher
@pytest.mark.fast
def test_to_device_moves_the_hidden_teacher_and_its_preprocessors(tiny_dataset, tmp_path):
    model = build(tiny_data(tiny_dataset), tmp_path)
    teacher = model.teacher
    preprocessors = [m for m in teacher.modules() if isinstance(m, BaseDataPreprocessor)]
    assert preprocessors, 'the teacher normalises the raw batch with its own DetDataPreprocessor'
    assert all(p.device == torch.device('cpu') for p in preprocessors)

    assert model.to('meta') is model
    meta = torch.device('meta')
    left_behind = [n for n, t in [*teacher.named_parameters(), *teacher.named_buffers()] if t.device != meta]
    assert not left_behind, f'teacher tensors left on cpu: {left_behind[:5]}'
    assert sum(1 for _ in teacher.buffers()) > 0  # BN statistics moved too
    assert all(p._device == meta and p.device == meta for p in preprocessors)
    assert all(t.device == meta for t in [*model.parameters(), *model.buffers()])
    assert model.student.data_preprocessor.device == meta


@pytest.mark.fast
def test_teacher_is_hidden_frozen_and_stays_in_eval_mode(tiny_dataset, tmp_path, hub):
    data = tiny_data(tiny_dataset)
    model = build(data, tmp_path, losses={'stage': dict(type='DMKDLoss', loss_weight=1.0), 'sfa': dict(type='PKDLoss')})
    teacher = model.teacher
    teacher_tensors = {id(t) for t in [*teacher.parameters(), *teacher.buffers()]}
    assert teacher_tensors
    assert not teacher_tensors & {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not any(name.startswith('teacher.') for name in model.state_dict())
    assert not any(name.startswith('teacher') for name, _ in model.named_modules())

    model.train()
    assert model.student.training and not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}  # BN running statistics included
    losses = model(**model.data_preprocessor(a_batch(data), True), mode='loss')
    total, _ = model.parse_losses(losses)
    total.backward()

    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(m.training for m in teacher.modules())
    # the gradient reached the student and the loss modules
    assert model.student.backbone.conv1.weight.grad.abs().sum() > 0
    assert all(m.fusion_logits.grad is not None for m in model.losses['stage'])


# ---------------------------------------------------------------- the two normalisations
@pytest.mark.fast
def test_stage_term_sums_each_level_and_me_term_averages_it(tiny_dataset, tmp_path, hub):
    """L_stage (Eq. 7): MGD's sum over C, H, W, mean over N, so larger levels weigh more;
    L_aug (Eq. 8): a per-element mean per level."""
    data = tiny_data(tiny_dataset)
    table, _ = me_table(data, tmp_path / 'me.json', noise_prob=1.0)  # every image gets a view
    alpha, beta, seed, it = 0.7, 0.3, 5, 11
    model = build(
        data,
        tmp_path,
        teacher='retinanet',
        seed=seed,
        aug_loss_weight=beta,
        losses={'stage': dict(type='DMKDLoss', loss_weight=alpha)},
    )
    model.train()
    hub.update_info('iter', it)
    raw = a_batch(data, 4, me_table=table)
    views = [s.metainfo['me_view'] for s in raw['data_samples']]
    originals = list(raw['inputs'])
    losses = model(**model.data_preprocessor(raw, True), mode='loss')
    strides = [8, 16, 32]
    assert {k for k in losses if k.startswith('loss_distill')} == {
        f'loss_distill_{term}_s{s}' for term in ('stage', 'aug') for s in strides
    }

    def expected(weight: float, images: list[torch.Tensor], reduce, *tag: str) -> dict[int, torch.Tensor]:
        """weight * reduce((reconstruct(S, T) - T)^2), with the draws of (seed, it, level)."""
        batch = dict(inputs=images, data_samples=None)
        with torch.no_grad():
            s_feats = model.student.extract_feat(model.student.data_preprocessor(batch, True)['inputs'])
            t_feats = model.teacher.extract_feat(model.teacher.data_preprocessor(batch, True)['inputs'])
            out = {}
            for level, pair in enumerate(model.level_pairs):
                s, t = s_feats[pair['student_idx']], t_feats[pair['teacher_idx']]
                gen = torch.Generator().manual_seed(draw_seed(seed, it, level, *tag))
                rebuilt = model.losses['stage'][level].reconstruct(s, t, gen)
                out[pair['stride']] = weight * reduce((rebuilt - t) ** 2)
        return out

    stage = expected(alpha, originals, lambda sq: sq.sum() / sq.shape[0])
    view_images = [torch.from_numpy(v.transpose(2, 0, 1).copy()) for v in views]
    aug = expected(beta, view_images, torch.mean, 'aug')
    for s in strides:
        torch.testing.assert_close(losses[f'loss_distill_stage_s{s}'].detach(), stage[s], rtol=1e-5, atol=0)
        torch.testing.assert_close(losses[f'loss_distill_aug_s{s}'].detach(), aug[s], rtol=1e-5, atol=0)
        assert not torch.isclose(stage[s] / alpha, aug[s] / beta), 'the views are other images'


@pytest.mark.fast
@pytest.mark.parametrize(
    ('reduction', 'shares'), [('sum_over_batch', [16 / 21, 4 / 21, 1 / 21]), ('mean', [1 / 3] * 3)]
)
def test_level_weighting_of_the_stage_loss_by_hand(reduction, shares):
    """The same per-element error e on 4x4, 2x2 and 1x1 maps of 2 channels, batch 2: MGD's
    reduction gives each level C*H*W*e (32e, 8e, 2e: shares 16/21, 4/21, 1/21), the withdrawn
    per-element reading e on each (1/3 each)."""
    from dfmsd.models.losses.common import reduce_squared_error

    e = 0.25  # (0.5)^2
    terms = [
        reduce_squared_error(torch.full((2, 2, hw, hw), 0.5), torch.zeros(2, 2, hw, hw), reduction).item()
        for hw in (4, 2, 1)
    ]
    total = sum(terms)
    assert [t / total for t in terms] == pytest.approx(shares)
    assert terms[0] == pytest.approx(2 * 4 * 4 * e if reduction == 'sum_over_batch' else e)


@pytest.mark.fast
def test_the_committed_methods_keep_mgd_reduction():
    params = load_params(REPO / 'params.yaml')
    torch.manual_seed(0)
    preds_s, preds_t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)

    def check(loss_spec, reduction: str) -> None:
        loss = MODELS.build(dict(loss_spec.model_dump(exclude_none=True), student_channels=16, teacher_channels=16))
        assert loss.reduction == reduction
        got = loss(preds_s, preds_t, generator=torch.Generator().manual_seed(1))
        err = (loss.reconstruct(preds_s, preds_t, torch.Generator().manual_seed(1)) - preds_t) ** 2
        want = err.sum() / preds_s.shape[0] if reduction == 'sum_over_batch' else err.mean()
        torch.testing.assert_close(got.detach(), loss.loss_weight * want.detach(), rtol=1e-6, atol=0)

    for name in ('mgd', 'dmkd'):
        check(params.methods[name].losses['feature'], 'sum_over_batch')
    dfmsd = [params.sal_methods['dfmsd'], params.me_methods['dfmsd_no_sal']]
    for method in dfmsd:
        check(method.losses['stage'], 'sum_over_batch')
        assert method.aug_loss_weight > 0


# ---------------------------------------------------------------- levels
@pytest.mark.fast
@pytest.mark.parametrize(('min_cells', 'strides'), [(2, [8, 16, 32]), (1, [8, 16, 32, 64])])
def test_levels_with_enough_cells_are_matched_by_stride(tiny_dataset, tmp_path, hub, min_cells, strides):
    data = tiny_data(tiny_dataset)
    model = build(data, tmp_path, teacher='faster_rcnn', min_cells=min_cells)  # teacher P2-P6, student P3-P7
    assert [p['stride'] for p in model.level_pairs] == strides
    assert [p['cells'] for p in model.level_pairs] == [max(1, SIZE // s) for s in strides]
    # RetinaNet's P3 is its level 0; Faster R-CNN's is its level 1 (P2 comes first)
    assert [(p['student_idx'], p['teacher_idx']) for p in model.level_pairs] == [
        (i, i + 1) for i in range(len(strides))
    ]
    assert model.state_dict()['distilled_strides'].tolist() == strides
    losses = model(**model.data_preprocessor(a_batch(data), True), mode='loss')
    assert sorted(k for k in losses if k.startswith('loss_distill')) == sorted(
        f'loss_distill_feature_s{s}' for s in strides
    )


# ---------------------------------------------------------------- loss inputs
class PyramidRecorder(DistillLoss):
    """A whole-pyramid loss that keeps what the distiller handed it."""

    per_level = False

    def __init__(self, student_channels, teacher_channels):
        super().__init__()
        self.calls = []

    def forward(self, preds_S, preds_T, *, stride, strides, level, generator):
        draw = torch.rand(1, generator=generator).item()
        self.calls.append(dict(levels=len(preds_S), stride=stride, strides=strides, level=level, draw=draw))
        return {'zero': sum(s.sum() for s in preds_S) * 0.0}


MODELS.register_module(module=PyramidRecorder, force=True)


@pytest.mark.fast
def test_each_loss_gets_the_inputs_its_forward_names(tiny_dataset, tmp_path, hub):
    data = tiny_data(tiny_dataset)
    seed, it, strides = 5, 3, [8, 16, 32]
    mgd = dict(type='MGDLoss', loss_weight=1.0)
    model = build(
        data, tmp_path, teacher='retinanet', seed=seed, losses={'a': mgd, 'b': mgd, 'all': dict(type='PyramidRecorder')}
    )
    assert (MODELS.get('MGDLoss').needs, PyramidRecorder.needs) == (
        {'generator'},
        {'stride', 'strides', 'level', 'generator'},
    )
    model.train()
    hub.update_info('iter', it)
    batch = a_batch(data)
    losses = model(**model.data_preprocessor(batch, True), mode='loss')
    # level by level every per-level loss, then the whole-pyramid ones
    assert [k for k in losses if k.startswith('loss_distill')] == [
        f'loss_distill_{name}_s{s}' for s in strides for name in 'ab'
    ] + ['loss_distill_all_zero']
    (call,) = model.losses['all'][0].calls
    first = torch.rand(1, generator=torch.Generator().manual_seed(draw_seed(seed, it, 'all'))).item()
    assert call == dict(levels=3, stride=strides, strides=strides, level=None, draw=first)
    # a level's losses share its generator: b's mask takes the draws after a's
    with torch.no_grad():
        s_feats = model.student.extract_feat(model.student.data_preprocessor(batch, True)['inputs'])
        t_feats = model.teacher.extract_feat(model.teacher.data_preprocessor(batch, True)['inputs'])
        for level, pair in enumerate(model.level_pairs):
            s, t = s_feats[pair['student_idx']], t_feats[pair['teacher_idx']]
            a, b = model.losses['a'][level], model.losses['b'][level]
            gen = torch.Generator().manual_seed(draw_seed(seed, it, level))
            for name, loss in (('a', a), ('b', b)):
                got = losses[f'loss_distill_{name}_s{pair["stride"]}'].detach()
                torch.testing.assert_close(got, loss.error(loss.reconstruct(s, t, gen), t), rtol=1e-5, atol=0)
            alone = b.error(b.reconstruct(s, t, torch.Generator().manual_seed(draw_seed(seed, it, level))), t)
            assert not torch.isclose(losses[f'loss_distill_b_s{pair["stride"]}'].detach(), alone, rtol=1e-3)


@pytest.mark.fast
def test_a_loss_that_names_an_unknown_input_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match=r"unknown inputs \['anchors'\]"):

        class NeedsAnchors(DistillLoss):
            def forward(self, preds_S, preds_T, *, stride, anchors):
                return preds_S.sum()


# ---------------------------------------------------------------- ME transform
@pytest.mark.fast
def test_me_transform_makes_the_offline_reference_views_pixel_for_pixel(tiny_dataset, tmp_path):
    data = tiny_data(tiny_dataset)
    table_file, table = me_table(data, tmp_path / 'me.json', noise_prob=0.5)
    assert all(table['counts'][op] > 0 for op in OPS), table['counts']
    coco = load_json(Path(data.root) / data.splits['train'].ann)
    reference = write_views(coco, Path(data.root) / data.splits['train'].img, table_file, tmp_path / 'views')
    resize = TRANSFORMS.build(dict(type='Resize', scale=(SIZE, SIZE), keep_ratio=True))
    dataset = train_dataset(data, table_file)  # the training pipeline, with MaskingEnhancement inserted
    compared = {op: 0 for op in OPS}
    for i in range(len(dataset)):
        sample = dataset[i]['data_samples']
        op = table['ops'][str(sample.img_id)]
        online = sample.metainfo.get('me_view')
        compared[op] += 1
        if op == 'none':
            assert online is None and sample.img_id not in reference
            continue
        ref = mmcv.imread(str(reference[sample.img_id]))  # BGR, as LoadImageFromFile loads
        ref = resize(dict(img=ref, img_shape=ref.shape[:2], ori_shape=ref.shape[:2]))['img']
        assert online.dtype == np.uint8 and online.shape == ref.shape, (op, online.shape, ref.shape)
        assert np.array_equal(online, ref), f'image {sample.img_id} ({op}): online view differs from the reference'
    assert all(compared.values()), compared


# ---------------------------------------------------------------- checkpoint errors
def _unpickling_marker(marker: Path):
    class MakesDirectory:  # unpickling it runs os.mkdir(marker)
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    return MakesDirectory()


@pytest.mark.fast
@pytest.mark.parametrize('damage', ['garbage', 'truncated', 'code'])
def test_damaged_teacher_checkpoint_names_the_file_and_the_remedy(tiny_dataset, tmp_path, damage):
    data = tiny_data(tiny_dataset)
    path = tmp_path / 'teacher' / 'model.pth'
    marker = tmp_path / 'unpickled'
    if damage == 'garbage':
        path.parent.mkdir()
        path.write_bytes(b'\x80\x04 not a checkpoint \x00' * 50)
    elif damage == 'truncated':
        torch.manual_seed(0)
        teacher = MODELS.build(detector_config(small('faster_rcnn'), data, 'teacher').model)
        export_plain_checkpoint(teacher.state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a pickle that runs code when fully unpickled
        path.parent.mkdir()
        torch.save({'state_dict': {}, 'meta': _unpickling_marker(marker)}, path)
    with pytest.raises(CheckpointError) as err:
        build(data, tmp_path, checkpoint=path)
    message = str(err.value)
    assert str(path) in message and 'teacher' in message
    assert re.search(rf'`dvc checkout [^`]*{re.escape(str(path))}`', message) and 'dvc repro' in message
    assert 'weights_only' not in message, message
    assert not marker.exists()


@pytest.mark.fast
def test_training_state_with_a_wrong_hash_is_refused_before_unpickling(tiny_dataset, tmp_path, monkeypatch):
    data = tiny_data(tiny_dataset)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('DVC_STAGE', 'sal2@x')
    marker = tmp_path / 'unpickled'
    state = tmp_path / 'sal1' / 'state.pth'
    state.parent.mkdir()
    torch.save({'meta': _unpickling_marker(marker)}, state)
    Path(f'{state}.sha256').write_text('0' * 64 + '\n')

    register_verified_checkpoints()
    cfg = training_config(small('retinanet'), data, Train(batch_size=2, iters=2), 2, 0, 'students.retinanet')
    refusals = [
        lambda: load_verified(state),
        lambda: CheckpointLoader.load_checkpoint(f'{VERIFIED_SCHEME}{state}'),
        lambda: run_training(cfg, threads=torch.get_num_threads(), resume_from=state),
    ]
    for refuse in refusals:
        with pytest.raises(CheckpointError) as err:
            refuse()
        assert str(state) in str(err.value) and 'weights_only' not in str(err.value)
        assert not marker.exists(), 'the file was unpickled before its hash was checked'

    record_hash(state)  # the same file with its true hash is unpickled: the marker shows it
    load_verified(state)
    assert marker.is_dir()
