"""COCO-size distillation steps on random weights (issue 14): a RetinaNet-R50 student
(mmdet's retinanet_r50_fpn_2x_coco model) with a large teacher, 1333x800 inputs, batch 2.

    PYTHONPATH=/tmp/site:$PWD python scripts/gpu/coco_size_bench.py --out $OUT/coco_bench.json

Per teacher and method, with AMP off and on (mmengine's OptimWrapper / AmpOptimWrapper, SGD
as presets/coco.yaml): the median time of one training step (model.train_step: preprocessing,
student + teacher forward, losses, backward, optimizer step), its floor (the student's own
step + the teacher's feature forward, each timed alone the same way) and the peak allocated
GPU memory. Methods: the StageDistiller with presets/coco.yaml's COCO-scale loss weights;
`dfmsd_me` is DFMSD's ME stage with a masking-enhanced view for every image (the most ME can
add: on COCO only some images get one). Weights are random and no checkpoint is read: the
numbers are costs, not accuracies (mmdet's initialisation of both models; SGD at lr 1e-4 so
that random weights stay finite without a warm-up). Deterministic algorithms are on, as in the project's
training configs (randomness.deterministic).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

STUDENT = 'retinanet/retinanet_r50_fpn_2x_coco.py'
TEACHERS = {
    'swin-s_mask-rcnn': 'swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py',
    'x101-64x4d_retinanet': 'retinanet/retinanet_x101-64x4d_fpn_2x_coco.py',
    'r101_retinanet': 'retinanet/retinanet_r101_fpn_2x_coco.py',
}
DMKD = dict(type='DMKDLoss', loss_weight=2.0e-5, tau=0.5, lambda_s=0.5, lambda_c=0.5)
PKD = dict(type='PKDLoss', loss_weight=6.0)
# DFMSD's stage term: DMKD as a per-element mean (Eq. 7), alpha 28.6; beta 14.3 (presets/coco.yaml)
STAGE = dict(DMKD, loss_weight=28.6, reduction='mean')
METHODS = {  # presets/coco.yaml's COCO-scale weights
    'mgd': (dict(feature=dict(type='MGDLoss', loss_weight=2.0e-5, lambda_mgd=0.65)), 0.0),
    'dmkd': (dict(feature=DMKD), 0.0),
    'pkd': (dict(feature=PKD), 0.0),
    'dfmsd': (dict(stage=STAGE, sfa=PKD), 0.0),  # SAL stage 1 (no ME)
    'dfmsd_me': (dict(stage=STAGE, sfa=PKD), 14.3),  # the ME stage, a view for every image
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def model_cfg(rel: str):
    from mmengine.config import Config

    from dfmsd.engine.zoo import mim_dir

    cfg = Config.fromfile(str(mim_dir() / 'configs' / rel))
    model = cfg.model
    model.backbone.init_cfg = None  # random weights: nothing downloaded
    return model


def batch(n: int, gen: torch.Generator, views: bool, h: int = 800, w: int = 1333):
    import numpy as np
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for _ in range(n):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen))
        k = 7  # COCO's mean number of boxes per image
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
        wh = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.3, h * 0.3]) + 8
        s = DetDataSample(
            metainfo=dict(
                img_shape=(h, w),
                ori_shape=(h, w),
                scale_factor=(1.0, 1.0),
                flip=False,
                flip_direction=None,
                img_id=0,
                img_path='',
            )
        )
        s.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], 1), labels=torch.randint(0, 80, (k,), generator=gen)
        )
        if views:
            s.set_metainfo(dict(me_view=np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)))
        samples.append(s)
    return dict(inputs=inputs, data_samples=samples)


def optim(model, amp: str | None):
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    # lr 1e-4, not the preset's 0.01: no warm-up here, and random weights must stay finite
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9, weight_decay=1e-4)
    return AmpOptimWrapper(optimizer=sgd, dtype=amp) if amp else OptimWrapper(optimizer=sgd)


def time_steps(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(median ms, peak MiB) of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    sync()
    reset_peak()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), peak_mib()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--teachers', nargs='*', default=['swin-s_mask-rcnn', 'x101-64x4d_retinanet'])
    parser.add_argument('--methods', nargs='*', default=list(METHODS))
    parser.add_argument('--amp', nargs='*', default=['off', 'fp16'], help='off, fp16, bf16')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--no-deterministic', action='store_true')
    parser.add_argument('--device', default='cuda', help='cpu: a check of this script, not a measurement')
    parser.add_argument('--size', default='1333x800', help='input width x height')
    args = parser.parse_args()

    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.models.distiller import StageDistiller

    init_default_scope('mmdet')
    if not args.no_deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(0)
    w, h = map(int, args.size.split('x'))
    plain, with_views = batch(args.batch, gen, False, h, w), batch(args.batch, gen, True, h, w)
    dev = args.device
    amps = [None if a == 'off' else {'fp16': 'float16', 'bf16': 'bfloat16'}[a] for a in args.amp]
    out = {
        'gpu': torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu',
        'torch': torch.__version__,
        'batch': args.batch,
        'input': args.size,
        'deterministic': not args.no_deterministic,
        'student': STUDENT,
        'teachers': {k: TEACHERS[k] for k in args.teachers},
        'rows': [],
        'errors': {},
    }

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))

    student_cfg = model_cfg(STUDENT)
    # the floor's first term: the student's own training step
    student_ms = {}
    with torch.device(dev):
        student = MODELS.build(copy.deepcopy(student_cfg))
        student.init_weights()  # mmdet's own initialisation (Kaiming, zero-initialised residuals)
    student.to(dev).train()
    for amp in amps:
        ow = optim(student, amp)
        ms, mem = time_steps(lambda ow=ow: student.train_step(copy.copy(plain), ow), args.warmup, args.iters)
        student_ms[amp] = ms
        out['rows'].append(
            dict(teacher='-', method='student alone', amp=amp or 'off', step_ms=round(ms, 1), peak_mib=round(mem))
        )
        print(out['rows'][-1], flush=True)
    student = ow = None  # free the GPU memory
    torch.cuda.empty_cache()

    for tname in args.teachers:
        t_cfg = model_cfg(TEACHERS[tname])
        teacher_ms = {}
        for mname in args.methods:
            losses, beta = METHODS[mname]
            data = with_views if beta else plain
            try:
                with torch.device(dev):
                    model = StageDistiller(
                        student=copy.deepcopy(student_cfg),
                        teacher=dict(config=dict(model=copy.deepcopy(t_cfg)), checkpoint=None),
                        losses=copy.deepcopy(losses),
                        aug_loss_weight=beta,
                        seed=0,
                        min_cells=2,
                        probe_size=min(h, w),
                    )
                    model.init_weights()
                    model.teacher.init_weights()  # random, but mmdet's initialisation: finite features
                model.to(dev).train()
                t_dev = next(model.teacher.parameters()).device.type
                assert t_dev == dev == model.teacher.data_preprocessor._device.type, (t_dev, dev)
                for amp in amps:
                    if amp not in teacher_ms:  # the floor's second term: the teacher's feature forward

                        def t_fwd(amp=amp, model=model):
                            with (
                                torch.no_grad(),
                                torch.autocast(dev, dtype=getattr(torch, amp or 'bfloat16'), enabled=amp is not None),
                            ):
                                model._teacher_feats(copy.copy(plain))

                        teacher_ms[amp], t_mem = time_steps(t_fwd, args.warmup, args.iters)
                        out['rows'].append(
                            dict(
                                teacher=tname,
                                method='teacher forward',
                                amp=amp or 'off',
                                step_ms=round(teacher_ms[amp], 1),
                                peak_mib=round(t_mem),
                            )
                        )
                        print(out['rows'][-1], flush=True)
                    ow = optim(model, amp)
                    logs = {}

                    def step(ow=ow, data=data, logs=logs, model=model):
                        logs.update(model.train_step(copy.copy(data), ow))

                    ms, mem = time_steps(step, args.warmup, args.iters)
                    floor = student_ms[amp] + teacher_ms[amp]
                    finite = all(torch.isfinite(torch.as_tensor(v)).all().item() for v in logs.values())
                    loss = float(torch.as_tensor(logs.get('loss', float('nan'))).detach())
                    row = dict(
                        teacher=tname,
                        method=mname,
                        amp=amp or 'off',
                        step_ms=round(ms, 1),
                        floor_ms=round(floor, 1),
                        ratio=round(ms / floor, 2),
                        peak_mib=round(mem),
                        finite=finite,
                        loss=round(loss, 3),
                        distill_terms=sorted(k for k in logs if k.startswith('loss_distill'))[:3],
                    )
                    if hasattr(ow, 'loss_scaler'):
                        row['loss_scale'] = float(ow.loss_scaler.get_scale())
                    out['rows'].append(row)
                    print(row, flush=True)
                    save()
                model = ow = None
            except Exception as err:  # noqa: BLE001
                out['errors'][f'{tname}/{mname}'] = ''.join(traceback.format_exception(err))[-3000:]
                print(out['errors'][f'{tname}/{mname}'], file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    save()
    print('\nteacher | method | AMP | step ms | floor ms | ratio | peak MiB | finite')
    for r in out['rows']:
        print(
            f'{r["teacher"]} | {r["method"]} | {r["amp"]} | {r["step_ms"]} | {r.get("floor_ms", "-")} | '
            f'{r.get("ratio", "-")} | {r["peak_mib"]} | {r.get("finite", "-")}'
        )
    print('errors:', list(out['errors']) or 'none')
    return 1 if out['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
