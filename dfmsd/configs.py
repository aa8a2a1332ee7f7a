"""Turn a params.yaml model entry into a complete mmdet config.

A model entry names a config file and, for the small presets, the backbone depth and
width and the FPN width; this module is the one place that applies those overrides,
points the config at a dataset, and sets the iteration budget.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

from mmengine.config import Config

from dfmsd.params import ParamsError

RESNET_EXPANSION = {18: 1, 34: 1, 50: 4, 101: 4, 152: 4}

# Where a dataset's splits live under `data.root`: params.yaml `data.train_ann`,
# `data.train_img`, `data.val_ann`, `data.val_img`, defaulting to the synthetic layout
# (the COCO preset gives the COCO 2017 names). Every stage reads them through data_layout.
DATA_LAYOUT = {'train_ann': 'annotations/instances_train.json', 'train_img': 'train/',
               'val_ann': 'annotations/instances_val.json', 'val_img': 'val/'}
ZOO_CONFIG_PREFIX = 'zoo:'


def data_layout(data: dict[str, Any]) -> dict[str, str]:
    """params `data` -> the four split paths, relative to `data.root`; image dirs end in '/'."""
    layout = {key: str(data.get(key) or default) for key, default in DATA_LAYOUT.items()}
    for key in ('train_img', 'val_img'):
        layout[key] = layout[key].rstrip('/') + '/'
    return layout


def split_files(data: dict[str, Any], split: str) -> tuple[Path, Path]:
    """(annotation file, image directory) of `split` ('train' or 'val') under `data.root`."""
    layout = data_layout(data)
    root = Path(data['root'])
    return root / layout[f'{split}_ann'], root / layout[f'{split}_img']


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


def set_iterations(cfg: Config, max_iters: int, checkpoint_interval: int | None = None,
                   warmup_iters: int | None = None) -> None:
    """Budget in iterations; warm-up (default: min(100, 10%)) and cosine decay follow it."""
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters + 1)
    warmup = min(100, max(1, max_iters // 10)) if warmup_iters is None else max(1, min(int(warmup_iters), max_iters))
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=max_iters, eta_min_ratio=0.05),
    ]
    interval = checkpoint_interval or max(1, max_iters // 5)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=interval, by_epoch=False,
                                        max_keep_ckpts=1, save_last=True)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=max(1, min(20, max_iters // 10)))
    if cfg.get('log_processor'):  # model-zoo configs log per epoch; the loop counts iterations
        cfg.log_processor.by_epoch = False
    # Evaluation is its own DVC stage; mmengine would otherwise validate at the last iteration.
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None


def resolve_config_path(config: str, name: str = 'model') -> Path:
    """A model entry's `config`: a file path, or `zoo:<mmdet model-index name>` for the config
    inside the installed mmdet package (dfmsd.zoo)."""
    config = str(config)
    if config.startswith(ZOO_CONFIG_PREFIX):
        from dfmsd.zoo import find_model
        try:
            cfg_path = Path(find_model(config[len(ZOO_CONFIG_PREFIX):]).config)
        except KeyError as err:
            raise ParamsError(f'params.yaml: models.{name}.config: {err.args[0]}') from None
    else:
        cfg_path = Path(config)
    if not cfg_path.is_file():
        raise ParamsError(f'params.yaml: models.{name}.config: {cfg_path} does not exist')
    return cfg_path


def build_model_config(entry: dict[str, Any], *, data_root: str | Path, image_size: int | None = None,
                       name: str = 'model', layout: dict[str, str] | None = None) -> Config:
    """Config for one params.yaml `models.<name>` entry (no schedule applied).

    `layout` holds the split paths (see data_layout); the synthetic layout by default.
    """
    if 'config' not in entry:
        raise ParamsError(f"params.yaml: models.{name} has no 'config' key")
    cfg = Config.fromfile(str(resolve_config_path(entry['config'], name)))
    if 'depth' in entry:
        _set_backbone_widths(cfg.model, int(entry['depth']), int(entry['width']),
                             int(entry['fpn_channels']))
    point_at_dataset(cfg, data_root, image_size, **(layout or {}))
    return cfg


def apply_training_params(cfg: Config, params: dict[str, Any], iters: int) -> None:
    """Seed, batch size (per process), optimizer, learning rate and iteration budget.

    `train.optimizer` (e.g. {type: SGD, lr: 0.02, momentum: 0.9, weight_decay: 1.0e-4})
    replaces the config's optimizer when it names a different type and is merged into it
    otherwise; `train.lr` then sets the learning rate; `train.warmup_iters` the warm-up.
    """
    train = params.get('train', {})
    cfg.randomness = dict(seed=int(params.get('seed', 0)), deterministic=True)
    cfg.train_dataloader.batch_size = int(train.get('batch_size', 8))
    if train.get('optimizer'):
        wanted = dict(train['optimizer'])
        current = cfg.optim_wrapper.optimizer
        same_type = wanted.get('type', current.get('type')) == current.get('type')
        cfg.optim_wrapper.optimizer = {**current, **wanted} if same_type else wanted
    if 'lr' in train:
        cfg.optim_wrapper.optimizer.lr = float(train['lr'])
    set_iterations(cfg, int(iters), train.get('checkpoint_interval'), train.get('warmup_iters'))


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
                              image_size=data.get('image_size'), name='student', layout=data_layout(data))


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
    cfg = copy.deepcopy(student_cfg)  # Config.copy() would share nested dicts with student_cfg
    cfg.custom_imports = dict(imports=['dfmsd.models'], allow_failed_imports=False)
    cfg.model = dict(
        type='StageDistiller',
        student=student_cfg.model,
        teacher=dict(config=f'{models_dir}/{run["teacher"]}.py',
                     checkpoint=f'{models_dir}/{run["teacher"]}.pth'),
        feature_loss=method.get('feature_loss'),
        sfa_loss=method.get('sfa_loss'),
        logit_loss=method.get('logit_loss'),
        aug_loss_weight=float(method.get('aug_loss_weight', 0.0)) if me_data_root else 0.0,
        student_init=run.get('init'),
        distill_strides=method.get('distill_strides'),
        # explicit, or the Runner would hand it the config's normalising top-level one
        data_preprocessor=dict(type='BaseDataPreprocessor'))
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
