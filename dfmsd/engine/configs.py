"""params -> complete mmdet configs: the one place that turns a model entry into a config.

A model entry names a config (a path, or ``mmdet::<path>`` inside the installed mmdet) and,
for the small presets, the backbone depth and widths. This module applies those, points the
config at a dataset split, and sets the seed, schedule and hooks of a training run.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from mmengine.config import Config

from dfmsd.core.errors import ParamsError
from dfmsd.core.params import Data, Detector, Method, Train
from dfmsd.data.coco import dataset_classes, split_files

RESNET_EXPANSION = {18: 1, 34: 1, 50: 4, 101: 4, 152: 4}
MMDET_SCOPE = 'mmdet::'
#: What makes mmengine import the project's registered types (distiller, losses, loop, hooks,
#: trackers): a config's ``custom_imports``, as mmdet's own tools load plugins.
PROJECT_IMPORTS = dict(imports=['dfmsd.models'], allow_failed_imports=False)
ME_META_KEYS = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip', 'flip_direction', 'me_view')


def register_project_types() -> None:
    """Import :data:`PROJECT_IMPORTS` as mmengine imports a config's ``custom_imports``: the
    engine reaches dfmsd.models (the layer above it) only through mmengine's registries."""
    from mmengine.utils import import_modules_from_strings

    import_modules_from_strings(**PROJECT_IMPORTS)


def resolve_config(config: str, where: str) -> str:
    """A config reference Config.fromfile takes, checked to exist; ``where`` names its key."""
    if config.startswith(MMDET_SCOPE):
        from dfmsd.engine.zoo import mim_dir

        path = mim_dir() / 'configs' / config[len(MMDET_SCOPE) :]
        if not path.is_file():
            raise ParamsError(
                f'params.yaml: {where}: {config} is not a config of the installed mmdet (looked for {path})'
            )
        return str(path)
    if not Path(config).is_file():
        raise ParamsError(f'params.yaml: {where}: {config} does not exist')
    return config


def _set_backbone_widths(model: Any, depth: int, width: int, fpn_channels: int) -> None:
    model.backbone.depth = depth
    model.backbone.base_channels = width
    model.neck.in_channels = [width * RESNET_EXPANSION[depth] * 2**i for i in model.backbone.out_indices]
    model.neck.out_channels = fpn_channels
    if 'rpn_head' in model:  # two-stage: RPN, RoI extractor and box head all read the FPN
        model.rpn_head.in_channels = model.rpn_head.feat_channels = fpn_channels
        model.roi_head.bbox_roi_extractor.out_channels = fpn_channels
        model.roi_head.bbox_head.in_channels = fpn_channels
    else:
        model.bbox_head.in_channels = model.bbox_head.feat_channels = fpn_channels
        # GroupNorm heads (FCOS, GFL) default to 32 groups; narrow FPNs need fewer.
        model.bbox_head.norm_cfg = dict(type='GN', num_groups=math.gcd(32, fpn_channels), requires_grad=True)


def _set_num_classes(model: Any, num_classes: int) -> None:
    for key in ('bbox_head', 'roi_head'):
        if key in model:
            heads = model[key].bbox_head if key == 'roi_head' else model[key]
            for head in heads if isinstance(heads, list) else [heads]:
                head.num_classes = num_classes
    if 'roi_head' in model and 'mask_head' in model.roi_head:  # zoo Mask R-CNN teachers
        model.roi_head.mask_head.num_classes = num_classes


def _set_image_size(pipeline: list, image_size: int | None) -> None:
    if image_size:
        for step in pipeline:
            if step['type'] == 'Resize':
                step['scale'] = (image_size, image_size)


def point_at_dataset(cfg: Config, data: Data, *, test_split: str = 'val') -> None:
    """Train on data's train split; validate and test on ``test_split``; classes from the files."""
    root = str(data.root).rstrip('/') + '/'
    classes = dataset_classes(split_files(data, 'train')[0])
    for loader, split in (
        (cfg.train_dataloader, 'train'),
        (cfg.val_dataloader, test_split),
        (cfg.test_dataloader, test_split),
    ):
        ds = loader.dataset
        while 'dataset' in ds:  # wrappers (RepeatDataset, ...) of zoo configs
            ds = ds.dataset
        spec = data.splits[split]
        ds.data_root, ds.ann_file, ds.data_prefix = root, spec.ann, dict(img=spec.img)
        ds.metainfo = dict(classes=classes)
        _set_image_size(ds.pipeline, data.image_size)
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        for ev in evaluator if isinstance(evaluator, list) else [evaluator]:
            ev.ann_file = root + data.splits[test_split].ann
    _set_num_classes(cfg.model, len(classes))


def detector_config(spec: Detector, data: Data, where: str) -> Config:
    """The model and data of one detector entry (no schedule yet)."""
    cfg = Config.fromfile(resolve_config(spec.config, f'{where}.config'))
    if not spec.pretrained:
        for part in cfg.model.values():
            if isinstance(part, dict):
                part.pop('init_cfg', None)
    if spec.depth is not None:
        _set_backbone_widths(cfg.model, spec.depth, spec.width, spec.fpn_channels)
    point_at_dataset(cfg, data)
    return cfg


def set_schedule(cfg: Config, train: Train, iters: int, *, lr: float | None = None, stop_at: int | None = None) -> None:
    """Iteration budget, warm-up (default min(100, 10%)) then cosine decay over all of it.

    ``stop_at`` ends this run early on the same schedule (a SAL stage). ``lr``: the model's
    own, else ``train.lr``, else the config's (then mmdet's auto_scale_lr adapts it when the
    global batch differs from the config's base batch).
    """
    cfg.train_dataloader.batch_size = train.batch_size
    if train.optimizer:
        current = cfg.optim_wrapper.optimizer
        same_type = train.optimizer['type'] == current.get('type')
        cfg.optim_wrapper.optimizer = {**current, **train.optimizer} if same_type else dict(train.optimizer)
    lr = lr or train.lr
    if lr:
        cfg.optim_wrapper.optimizer.lr = float(lr)
    base = train.base_batch_size or (cfg.get('auto_scale_lr') or {}).get('base_batch_size', 16)
    cfg.auto_scale_lr = dict(enable=lr is None or train.auto_scale_lr, base_batch_size=base)
    cfg.train_cfg = dict(
        type='StagedIterBasedTrainLoop',
        max_iters=iters,
        stop_at=stop_at,
        val_interval=train.validate_every or iters + 1,
    )
    # mmengine's LinearLR over a single iteration never leaves its start factor: at least 2
    warmup = train.warmup_iters or min(100, max(2, iters // 10))
    warmup = max(2, min(warmup, iters))
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup)]
    if warmup < iters:  # a warm-up as long as the budget (warmup_iters >= iters) leaves nothing to decay
        cfg.param_scheduler.append(
            dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=iters, eta_min_ratio=0.05)
        )
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', interval=train.checkpoint_interval, by_epoch=False, max_keep_ckpts=2, save_last=True
    )
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=max(1, min(20, iters // 10)))
    cfg.default_hooks.pop('visualization', None)  # no image dumps during training
    backends = {'dvclive': dict(type='QuietDVCLiveVisBackend'), 'tensorboard': dict(type='TensorboardVisBackend')}
    if cfg.get('visualizer'):  # LocalVisBackend's scalars.json feeds the committed loss log
        cfg.visualizer.vis_backends = [dict(type='LocalVisBackend')] + [backends[t] for t in train.trackers]
    if cfg.get('log_processor'):  # model-zoo configs log per epoch; the loop counts iterations
        cfg.log_processor.by_epoch = False
    cfg.custom_hooks = [dict(type='DivergenceGuard', patience=3)] + [
        h for h in cfg.get('custom_hooks', []) if h.get('type') != 'DivergenceGuard'
    ]
    if not train.validate_every:
        cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    else:
        cfg.val_cfg = dict(type='ValLoop')


def set_seed(cfg: Config, seed: int) -> None:
    cfg.randomness = dict(seed=int(seed), deterministic=True)


def training_config(spec: Detector, data: Data, train: Train, iters: int, seed: int, where: str) -> Config:
    """A detector trained from ground truth (a teacher, or the baseline student)."""
    cfg = detector_config(spec, data, where)
    set_schedule(cfg, train, iters, lr=spec.lr)
    set_seed(cfg, seed)
    return cfg


def with_me_views(cfg: Config, table: str) -> None:
    """Add the MaskingEnhancement transform (views of the table's images) to the train pipeline."""
    ds = cfg.train_dataloader.dataset
    pipeline = [dict(step) for step in ds.pipeline]
    resize = next((dict(s) for s in pipeline if s['type'] == 'Resize'), None)
    load = next(i for i, s in enumerate(pipeline) if s['type'] == 'LoadImageFromFile')
    pipeline.insert(load + 1, dict(type='MaskingEnhancement', table=str(table), resize=resize))
    pipeline[-1] = dict(pipeline[-1], meta_keys=ME_META_KEYS)
    ds.pipeline = pipeline


def distill_config(
    student: Config,
    teacher_dir: str | Path,
    method: Method,
    *,
    train: Train,
    iters: int,
    seed: int,
    min_cells: int,
    probe_size: int,
    me_table: str | None = None,
    stop_at: int | None = None,
    lr: float | None = None,
) -> Config:
    """A StageDistiller training config around the plain ``student`` config.

    ``teacher_dir`` holds the teacher's ``model.pth`` and ``model.py``. ``me_table`` adds
    the ME views and the ME loss (Eq. 8) with weight ``method.aug_loss_weight``.
    """
    cfg = copy.deepcopy(student)  # Config.copy() would share nested dicts with the student's
    cfg.custom_imports = copy.deepcopy(PROJECT_IMPORTS)
    teacher_dir = Path(teacher_dir)
    cfg.model = dict(
        type='StageDistiller',
        student=copy.deepcopy(student.model),
        teacher=dict(config=str(teacher_dir / 'model.py'), checkpoint=str(teacher_dir / 'model.pth')),
        losses={name: loss.model_dump(exclude_none=True) for name, loss in method.losses.items()},
        aug_loss_weight=method.aug_loss_weight if me_table else 0.0,
        seed=seed,
        min_cells=min_cells,
        probe_size=probe_size,
        # explicit, or the Runner would hand it the config's normalising top-level one
        data_preprocessor=dict(type='BaseDataPreprocessor'),
    )
    set_schedule(cfg, train, iters, lr=lr, stop_at=stop_at)
    cfg.custom_hooks.append(dict(type='LossScaleCheck', max_ratio=100.0))
    set_seed(cfg, seed)
    if me_table:
        with_me_views(cfg, me_table)
    return cfg


def probe_size_of(data: Data, cfg: Config) -> int:
    """The square size at which FPN levels are judged: the training size, else the shorter
    side of the config's Resize scale (800 for COCO's (1333, 800))."""
    if data.image_size:
        return int(data.image_size)
    for step in cfg.train_dataloader.dataset.get('pipeline', []):
        if step['type'] in ('Resize', 'RandomResize', 'RandomChoiceResize') and 'scale' in step:
            scale = step['scale']
            return int(min(scale if isinstance(scale[0], int) else scale[0]))
    return 800
