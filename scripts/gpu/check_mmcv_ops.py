"""mmcv's CUDA ops that mmdet's detectors use, against their CPU versions (issue 14).

    PYTHONPATH=/tmp/site:$PWD python scripts/gpu/check_mmcv_ops.py

Checks, on random inputs drawn afresh: nms and batched_nms (same kept boxes as on the CPU),
sigmoid_focal_loss forward and backward (against mmdet's pure-PyTorch focal loss, in float64
on the CPU), RoIAlign forward and backward (against mmcv's CPU kernel). Also which ops raise
under torch.use_deterministic_algorithms(True), as mmengine sets for `randomness.deterministic`
(the project's training configs), with and without CUBLAS_WORKSPACE_CONFIG. Exits 1 on a mismatch.

Status (docs/gpu.md): its one device run stopped at a SIGSEGV in mmcv's get_compiler_version,
which it no longer calls; the comparisons below have not run on a GPU yet.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def random_boxes(n: int, gen: torch.Generator, size: float = 800.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size
    wh = torch.rand(n, 2, generator=gen) * size / 4 + 1
    return torch.cat([xy, xy + wh], dim=1)


def main() -> int:
    import mmcv
    from mmcv.ops import RoIAlign, batched_nms, nms, sigmoid_focal_loss
    from mmdet.models.losses.focal_loss import py_sigmoid_focal_loss

    assert torch.cuda.is_available(), 'no GPU'
    # Not mmcv.ops.get_compiler_version / get_compiling_cuda_version: with the CUDA build of
    # mmcv 2.1.0 against torch 2.11+cu130 (gcc 13.3, nvcc 13.0) both crashed the interpreter
    # (SIGSEGV, docs/gpu.md); the ops themselves ran.
    ext = next(Path(mmcv.__file__).parent.glob('_ext*.so'))
    print(
        'mmcv',
        mmcv.__version__,
        '| _ext links libc10_cuda:',
        b'libc10_cuda.so' in ext.read_bytes(),
        '| torch',
        torch.__version__,
        '| GPU',
        torch.cuda.get_device_name(0),
        flush=True,
    )
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), 'little'))
    bad = []

    # nms / batched_nms: identical kept indices
    boxes, scores = random_boxes(3000, gen), torch.rand(3000, generator=gen)
    idx_cls = torch.randint(0, 80, (3000,), generator=gen)
    _, keep_cpu = nms(boxes, scores, 0.5)
    _, keep_gpu = nms(boxes.cuda(), scores.cuda(), 0.5)
    ok = torch.equal(keep_cpu, keep_gpu.cpu())
    _, bkeep_cpu = batched_nms(boxes, scores, idx_cls, dict(type='nms', iou_threshold=0.6))
    _, bkeep_gpu = batched_nms(boxes.cuda(), scores.cuda(), idx_cls.cuda(), dict(type='nms', iou_threshold=0.6))
    ok_b = torch.equal(bkeep_cpu, bkeep_gpu.cpu())
    print(f'nms: {len(keep_gpu)} kept, same as CPU: {ok}; batched_nms: {len(bkeep_gpu)} kept, same: {ok_b}')
    bad += [] if ok and ok_b else ['nms']

    # sigmoid focal loss, forward and backward, against mmdet's PyTorch version in float64
    logits = torch.randn(4096, 80, generator=gen) * 3
    target = torch.randint(0, 81, (4096,), generator=gen)  # 80 = background
    x = logits.cuda().requires_grad_()
    loss = sigmoid_focal_loss(x, target.cuda(), 2.0, 0.25, None, 'sum')
    loss.backward()
    ref_x = logits.double().requires_grad_()
    onehot = torch.nn.functional.one_hot(target, 81)[:, :80].double()
    ref = py_sigmoid_focal_loss(ref_x, onehot, None, 2.0, 0.25, 'sum')
    ref.backward()
    e_f, e_b = rel(loss.detach(), ref.detach()), rel(x.grad, ref_x.grad)
    print(f'sigmoid_focal_loss: forward rel err {e_f:.2e}, backward rel err {e_b:.2e}')
    bad += [] if e_f < 1e-5 and e_b < 1e-5 else ['sigmoid_focal_loss']

    # RoIAlign (mmdet's RoI extractor: output 7x7, sampling_ratio 0, aligned) vs the CPU kernel
    feat = torch.randn(2, 256, 100, 152, generator=gen)
    rois_xyxy = random_boxes(512, gen, 800.0)
    rois = torch.cat([torch.randint(0, 2, (512, 1), generator=gen).float(), rois_xyxy], dim=1)
    op = RoIAlign((7, 7), spatial_scale=1 / 8, sampling_ratio=0, aligned=True)
    f_cpu, f_gpu = feat.clone().requires_grad_(), feat.cuda().requires_grad_()
    o_cpu, o_gpu = op(f_cpu, rois), op(f_gpu, rois.cuda())
    w = torch.randn(o_cpu.shape, generator=gen)
    (o_cpu * w).sum().backward()
    (o_gpu * w.cuda()).sum().backward()
    e_f, e_b = rel(o_gpu.detach(), o_cpu.detach()), rel(f_gpu.grad, f_cpu.grad)
    print(f'RoIAlign: forward rel err {e_f:.2e}, backward rel err {e_b:.2e}')
    bad += [] if e_f < 1e-5 and e_b < 1e-5 else ['roi_align']

    # what raises under deterministic algorithms (mmengine's randomness.deterministic=True)
    probes = {
        'linear (cuBLAS) fwd+bwd': lambda: (
            torch.nn.Linear(64, 16).cuda()(torch.randn(8, 64, device='cuda', requires_grad=True)).sum().backward()
        ),
        'interpolate nearest bwd (FPN)': lambda: (
            torch.nn.functional.interpolate(
                torch.randn(2, 8, 10, 10, device='cuda', requires_grad=True), scale_factor=2.0, mode='nearest'
            )
            .sum()
            .backward()
        ),
        'cross_entropy (GFL DFL)': lambda: (
            torch.nn.functional.cross_entropy(
                torch.randn(64, 17, device='cuda', requires_grad=True),
                torch.randint(0, 17, (64,), device='cuda'),
                reduction='none',
            )
            .sum()
            .backward()
        ),
        'multinomial with cuda generator': lambda: torch.multinomial(
            torch.rand(4, 100, device='cuda'),
            50,
            replacement=False,
            generator=torch.Generator(device='cuda').manual_seed(0),
        ),
        'scatter_ / index_put': lambda: torch.ones(4, 100, device='cuda').scatter_(
            1, torch.randint(0, 100, (4, 50), device='cuda'), 0.0
        ),
        'sigmoid_focal_loss bwd (mmcv)': lambda: sigmoid_focal_loss(
            torch.randn(64, 80, device='cuda', requires_grad=True),
            torch.randint(0, 81, (64,), device='cuda'),
            2.0,
            0.25,
            None,
            'mean',
        ).backward(),
    }
    saved = os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)
    print(f'CUBLAS_WORKSPACE_CONFIG in the environment: {saved!r} (unset for the probe)')
    torch.use_deterministic_algorithms(True)
    for env in (None, ':4096:8'):
        if env:
            os.environ['CUBLAS_WORKSPACE_CONFIG'] = env
        for name, fn in probes.items():
            try:
                fn()
                torch.cuda.synchronize()
                print(f'deterministic, CUBLAS_WORKSPACE_CONFIG={env}: {name}: ok')
            except RuntimeError as err:
                print(f'deterministic, CUBLAS_WORKSPACE_CONFIG={env}: {name}: RAISES {str(err).splitlines()[0][:160]}')
    torch.use_deterministic_algorithms(False)
    print('ops check:', 'ALL OK' if not bad else f'MISMATCH in {bad}')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
