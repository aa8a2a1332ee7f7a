"""Turn a params.yaml model entry into a complete mmdet config.

A model entry names a config file and, for the small presets, the backbone depth and
width and the FPN width; this module is the one place that applies those overrides,
points the config at a dataset, and sets the iteration budget.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mmengine.config import Config

from dfmsd.params import ParamsError

RESNET_EXPANSION = {18: 1, 34: 1, 50: 4, 101: 4, 152: 4}


def dataset_classes(ann_file: str | Path) -> tuple[str, ...]:
    """Class names in category-id order, read from a COCO annotation file."""
    with open(ann_file) as f:
        cats = json.load(f)['categories']
    return tuple(c['name'] for c in sorted(cats, key=lambda c: c['id']))


def _set_backbone_widths(model: Any, depth: int, width: int, fpn_channels: int) -> None:
    if depth not in RESNET_EXPANSION:
        raise ParamsError(f'ResNet depth {depth} is not one of {sorted(RESNET_EXPANSION)}')
    model.backbone.depth = depth
    model.backbone.base_channels = width
    expansion = RESNET_EXPANSION[depth]
    model.neck.in_channels = [width * expansion * 2**i for i in model.backbone.out_indices]
    model.neck.out_channels = fpn_channels
    if 'rpn_head' in model:  # two-stage: RPN, RoI extractor and box head all read the FPN
        model.rpn_head.in_channels = model.rpn_head.feat_channels = fpn_channels
        model.roi_head.bbox_roi_extractor.out_channels = fpn_channels
        model.roi_head.bbox_head.in_channels = fpn_channels
    else:
        model.bbox_head.in_channels = model.bbox_head.feat_channels = fpn_channels
        # GroupNorm heads (FCOS, GFL) default to 32 groups; narrow FPNs need fewer.
        model.bbox_head.norm_cfg = dict(type='GN', num_groups=math.gcd(32, fpn_channels),
                                        requires_grad=True)


def _set_num_classes(model: Any, num_classes: int) -> None:
    heads = [model.roi_head.bbox_head] if 'roi_head' in model else [model.bbox_head]
    for head in heads:
        head.num_classes = num_classes


def point_at_dataset(cfg: Config, data_root: str | Path, image_size: int | None = None,
                     train_ann: str = 'annotations/instances_train.json', train_img: str = 'train/',
                     val_ann: str = 'annotations/instances_val.json', val_img: str = 'val/') -> None:
    """Aim the train/val/test loaders and the evaluator at a COCO-layout dataset."""
    data_root = str(data_root).rstrip('/') + '/'
    classes = dataset_classes(Path(data_root) / train_ann)
    for loader, ann, img in ((cfg.train_dataloader, train_ann, train_img),
                             (cfg.val_dataloader, val_ann, val_img),
                             (cfg.test_dataloader, val_ann, val_img)):
        ds = loader.dataset
        ds.data_root, ds.ann_file, ds.data_prefix = data_root, ann, dict(img=img)
        ds.metainfo = dict(classes=classes)
        if image_size:
            for step in ds.pipeline:
                if step['type'] == 'Resize':
                    step['scale'] = (image_size, image_size)
    for evaluator in (cfg.val_evaluator, cfg.test_evaluator):
        evaluator.ann_file = data_root + val_ann
    _set_num_classes(cfg.model, len(classes))


def set_iterations(cfg: Config, max_iters: int, checkpoint_interval: int | None = None) -> None:
    """Budget in iterations; warm-up and cosine decay follow it."""
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters + 1)
    warmup = min(100, max(1, max_iters // 10))
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=max_iters, eta_min_ratio=0.05),
    ]
    interval = checkpoint_interval or max(1, max_iters // 5)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=interval, by_epoch=False,
                                        max_keep_ckpts=1, save_last=True)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=max(1, min(20, max_iters // 10)))
    # Evaluation is its own DVC stage; mmengine would otherwise validate at the last iteration.
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None


def build_model_config(entry: dict[str, Any], *, data_root: str | Path, image_size: int | None = None,
                       name: str = 'model') -> Config:
    """Config for one params.yaml `models.<name>` entry (no schedule applied)."""
    if 'config' not in entry:
        raise ParamsError(f"params.yaml: models.{name} has no 'config' key")
    cfg_path = Path(entry['config'])
    if not cfg_path.is_file():
        raise ParamsError(f'params.yaml: models.{name}.config: {cfg_path} does not exist')
    cfg = Config.fromfile(str(cfg_path))
    if 'depth' in entry:
        _set_backbone_widths(cfg.model, int(entry['depth']), int(entry['width']),
                             int(entry['fpn_channels']))
    point_at_dataset(cfg, data_root, image_size)
    return cfg


def apply_training_params(cfg: Config, params: dict[str, Any], iters: int) -> None:
    """Seed, batch size, learning rate and iteration budget from params.yaml."""
    train = params.get('train', {})
    cfg.randomness = dict(seed=int(params.get('seed', 0)), deterministic=True)
    cfg.train_dataloader.batch_size = int(train.get('batch_size', 8))
    if 'lr' in train:
        cfg.optim_wrapper.optimizer.lr = float(train['lr'])
    set_iterations(cfg, int(iters), train.get('checkpoint_interval'))


def model_entry(params: dict[str, Any], name: str) -> dict[str, Any]:
    """`student` or a teacher name -> its params entry, with a clear error otherwise."""
    if name == 'student':
        if 'student' not in params:
            raise ParamsError("params.yaml: no 'student' entry")
        return params['student']
    teachers = params.get('teachers', {})
    if name not in teachers:
        raise ParamsError(f"params.yaml: unknown model '{name}' (teachers: {', '.join(teachers) or 'none'}; "
                          f"or 'student')")
    return teachers[name]


def student_config(params: dict[str, Any]) -> Config:
    data = params['data']
    return build_model_config(model_entry(params, 'student'), data_root=data['root'],
                              image_size=data.get('image_size'), name='student')


ME_META_KEYS = ('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'flip',
                'flip_direction', 'is_augmented')


def distill_config(params: dict[str, Any], run_name: str, *, me_data_root: str | None = None,
                   models_dir: str = 'models') -> tuple[Config, Config]:
    """(distiller config, plain student config) for a `distill.runs` / `me_runs` entry."""
    distill = params.get('distill', {})
    runs = {**distill.get('runs', {}), **distill.get('me_runs', {})}
    if run_name not in runs:
        raise ParamsError(f"params.yaml: no distillation run '{run_name}' in distill.runs / "
                          f"distill.me_runs (known: {', '.join(runs) or 'none'})")
    run = runs[run_name]
    method_name = run.get('method')
    methods = distill.get('methods', {})
    if method_name not in methods:
        raise ParamsError(f"params.yaml: distill run '{run_name}' uses unknown method "
                          f"'{method_name}' (known: {', '.join(methods) or 'none'})")
    method = methods[method_name]
    model_entry(params, run['teacher'])  # a clear error for an unknown teacher name

    student_cfg = student_config(params)
    cfg = student_cfg.copy()
    cfg.custom_imports = dict(imports=['dfmsd.models'], allow_failed_imports=False)
    cfg.model = dict(
        type='StageDistiller',
        student=student_cfg.model,
        teacher=dict(config=f'{models_dir}/{run["teacher"]}.py',
                     checkpoint=f'{models_dir}/{run["teacher"]}.pth'),
        feature_loss=method.get('feature_loss'),
        sfa_loss=method.get('sfa_loss'),
        aug_loss_weight=float(method.get('aug_loss_weight', 0.0)) if me_data_root else 0.0,
        student_init=run.get('init'),
        distill_strides=method.get('distill_strides'))
    apply_training_params(cfg, params, int(run['iters']))
    if me_data_root:
        _add_me_dataset(cfg, me_data_root)
    return cfg, student_cfg


def _add_me_dataset(cfg: Config, me_data_root: str) -> None:
    """Train on the original images plus their masking-enhanced copies."""
    original = cfg.train_dataloader.dataset
    pipeline = [dict(step) for step in original.pipeline]
    pipeline[-1] = dict(type='PackDetInputs', meta_keys=ME_META_KEYS)
    original.pipeline = pipeline
    augmented = dict(original, type='MEAugmentedCocoDataset',
                     data_root=str(me_data_root).rstrip('/') + '/',
                     ann_file='annotations.json', data_prefix=dict(img='images/'))
    cfg.train_dataloader.dataset = dict(type='ConcatDataset', datasets=[original, augmented])
