"""The embedded default's stages on a GPU, without DVC (issue 14): data, teachers, teacher
boxes and ME table, student init, baseline, MGD / DMKD / PKD, DFMSD stage 1 -> stage 2 (with
ME), and evaluation, each through the same package function its stage calls, with the params
sections built from params.yaml as stages/*.py build them (dvc.api.params_show is replaced by
load_params; only the iteration budgets are overridden).

    PYTHONPATH=/tmp/site:$PWD python scripts/gpu/default_on_gpu.py --iters 300 --teacher-iters 300 \\
        --work /tmp/gpu_default --out $OUT/default

Every training and test runner gets a timing hook (dfmsd.engine.runner.build_runner is
wrapped): per iteration the compute time from before_train_iter to after_train_iter with the
device synchronised (data loading excluded, reported apart), the device of the model's
parameters, and the peak allocated memory. After training, each teacher's feature forward
(what the distiller runs: preprocessor + backbone + neck, no grad) is timed on real training
batches, so that each method's ratio to its floor (student step + teacher forward) is known.

Writes <out>/summary.json and a table on stdout. --amp fp16|bf16 trains with mmengine's
AmpOptimWrapper; --pinned gives the train loaders 4 workers and pinned memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

TIMES: dict[str, dict] = {}  # stage label -> what the timing hook saw


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def install_timing(amp: str | None, pinned: bool) -> None:
    """Wrap dfmsd.engine.runner.build_runner: a timing hook in every runner, AMP / pinned loaders."""
    import torch
    from mmdet.registry import HOOKS
    from mmengine.hooks import Hook

    import dfmsd.engine.runner as runner_mod

    @HOOKS.register_module(force=True)
    class GpuStepTimer(Hook):
        priority = 'VERY_HIGH'

        def __init__(self, label: str):
            self.label = label
            self.rec = TIMES.setdefault(label, {'step_s': [], 'data_s': [], 'loss': []})
            self._t0 = self._t_end = None

        def _device(self, runner):
            model = runner.model.module if hasattr(runner.model, 'module') else runner.model
            return str(next(model.parameters()).device)

        def before_train(self, runner):
            self.rec['device'] = self._device(runner)
            self.rec['optim_wrapper'] = type(runner.optim_wrapper).__name__
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            sync()
            now = time.perf_counter()
            if self._t_end is not None:
                self.rec['data_s'].append(now - self._t_end)
            self._t0 = now

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            sync()
            self._t_end = time.perf_counter()
            self.rec['step_s'].append(self._t_end - self._t0)
            loss = (outputs or {}).get('loss')
            self.rec['loss'].append(None if loss is None else float(loss))

        def after_train(self, runner):
            if torch.cuda.is_available():
                self.rec['peak_mem_mib'] = torch.cuda.max_memory_allocated() / 2**20
            hub = runner.message_hub
            if 'train/grad_norm' in hub.log_scalars:
                self.rec['last_grad_norm'] = float(hub.get_scalar('train/grad_norm').current())

        def before_test(self, runner):
            self.rec['test_device'] = self._device(runner)
            self._tt = time.perf_counter()

        def after_test(self, runner):
            sync()
            self.rec.setdefault('test_s', []).append(time.perf_counter() - self._tt)

    original = runner_mod.build_runner

    def build_runner(cfg):
        label = os.environ.get('DVC_STAGE', 'run')
        cfg.custom_hooks = list(cfg.get('custom_hooks') or []) + [dict(type='GpuStepTimer', label=label)]
        if amp and cfg.get('train_cfg'):
            cfg.optim_wrapper.type = 'AmpOptimWrapper'
            cfg.optim_wrapper.dtype = amp
        if pinned and cfg.get('train_dataloader'):
            cfg.train_dataloader.update(num_workers=4, persistent_workers=True, pin_memory=True)
        return original(cfg)

    runner_mod.build_runner = build_runner


def teacher_forward_time(teacher_dir: Path, train_cfg_file: Path, amp: str | None, batches: int = 30) -> float:
    """Median time of the distiller's teacher work on one training batch: the teacher's own
    preprocessing, backbone and neck, no grad (StageDistiller._teacher_feats)."""
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner

    from dfmsd.models.distiller import build_teacher

    init_default_scope('mmdet')
    cfg = Config.fromfile(str(train_cfg_file))
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    teacher = build_teacher(str(teacher_dir / 'model.py'), str(teacher_dir / 'model.pth')).cuda()
    teacher.data_preprocessor._device = torch.device('cuda')  # what StageDistiller._set_device does
    data = [b for _, b in zip(range(batches), loader)]
    times = []
    ctx = (
        (lambda: torch.autocast('cuda', dtype=getattr(torch, {'fp16': 'float16', 'bf16': 'bfloat16'}[amp])))
        if amp
        else (lambda: torch.autocast('cuda', enabled=False))
    )
    for i, batch in enumerate(data * 2):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), ctx():
            teacher.extract_feat(teacher.data_preprocessor(batch, True)['inputs'])
        sync()
        if i >= len(data) // 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def summarise(rec: dict) -> dict:
    steps = rec.get('step_s', [])
    skip = max(1, len(steps) // 10)  # the first tenth: warm-up (allocator, cuDNN heuristics)
    body = steps[skip:] or steps
    losses = [x for x in rec.get('loss', []) if x is not None]
    out = {k: v for k, v in rec.items() if k not in ('step_s', 'data_s', 'loss', 'test_s')}
    if rec.get('test_s'):
        out['test_s'] = [round(t, 2) for t in rec['test_s']]
    if not steps:
        return out
    out.update(
        iters_timed=len(steps),
        step_median_ms=round(1e3 * statistics.median(body), 2) if body else None,
        step_mean_ms=round(1e3 * statistics.fmean(body), 2) if body else None,
        data_median_ms=round(1e3 * statistics.median(rec['data_s']), 2) if rec.get('data_s') else None,
        losses_finite=bool(losses) and all(math.isfinite(x) for x in losses),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--params', default=str(REPO / 'params.yaml'))
    parser.add_argument('--iters', type=int, default=300, help="every student row's budget (train.iters)")
    parser.add_argument('--teacher-iters', type=int, default=300)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--work', default='gpu_runs', help='data, models, logs, metrics go here')
    parser.add_argument('--out', required=True, help='summary.json and logs to bring back')
    parser.add_argument('--amp', choices=('fp16', 'bf16'), help='mmengine AmpOptimWrapper with this dtype')
    parser.add_argument('--pinned', action='store_true', help='train loaders: 4 workers, pinned memory')
    parser.add_argument('--skip-eval', action='store_true')
    parser.add_argument('--reuse', help='a previous --work: reuse its data, teachers, ME table and init')
    parser.add_argument('--only', nargs='*', help='student runs to do (baseline mgd dmkd pkd dfmsd ...)')
    parser.add_argument(
        '--cublas-check',
        action='store_true',
        help='first train the strong teacher (GFL: a cuBLAS matmul in its head) 5 iterations with '
        "CUBLAS_WORKSPACE_CONFIG unset, under the configs' deterministic algorithms",
    )
    args = parser.parse_args()

    import torch

    from dfmsd.core.io import read_json, write_json
    from dfmsd.core.params import launch_settings, load_params

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(args.reuse) if args.reuse else work
    p = load_params(args.params)
    data = p.data.model_copy(update={'root': str(base / 'data' / 'synthetic')})
    train = p.train.model_copy(update={'iters': args.iters, 'checkpoint_interval': max(args.iters, 1)})
    if 'trackers' in type(train).model_fields:  # DVCLive/TensorBoard are not installed on the GPU machine
        train = train.model_copy(update={'trackers': []})
    runtime, launch, seed = p.runtime, launch_settings(p.launch), args.seed
    pair_name, pair = next(iter(p.pairs.items()))
    student_name, student = next(iter(p.students.items()))
    summary: dict = {
        'torch': torch.__version__,
        'cuda': torch.version.cuda,
        'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'amp': args.amp,
        'pinned': args.pinned,
        'iters': args.iters,
        'teacher_iters': args.teacher_iters,
        'runs': {},
        'errors': {},
    }
    install_timing(args.amp, args.pinned)

    def save():
        write_json(out / 'summary.json', summary)

    def step(label: str, fn):
        os.environ['DVC_STAGE'] = label
        t0 = time.perf_counter()
        print(f'==== {label}', flush=True)
        try:
            fn()
            ok = True
        except Exception as err:  # noqa: BLE001 - report every stage, keep going
            summary['errors'][label] = ''.join(traceback.format_exception(err))[-3000:]
            print(summary['errors'][label], file=sys.stderr, flush=True)
            ok = False
        wall = time.perf_counter() - t0
        entry = summarise(TIMES.get(label, {}))
        entry['wall_s'] = round(wall, 1)
        summary['runs'][label] = {**summary['runs'].get(label, {}), **entry}
        print(f'==== {label}: {"ok" if ok else "FAILED"} in {wall:.1f} s {json.dumps(entry)[:400]}', flush=True)
        save()
        return ok

    models, logs, metrics = base / 'models', work / 'logs', work / 'metrics'
    teachers = {role: models / 'teachers' / pair_name / role for role in ('weak', 'strong')}
    me_table = base / 'data' / 'me' / pair_name / f'seed{seed}.json'
    init = models / 'students' / student_name / f'seed{seed}' / 'init'

    if not args.reuse:

        def make_data():
            from dfmsd.data.coco import split_files, validate_coco
            from dfmsd.data.synthetic import generate_from_params

            generate_from_params(data)
            for split in data.splits:
                validate_coco(*split_files(data, split))

        step('data', make_data)

        if args.cublas_check:
            from dfmsd.engine.teachers import train_teacher

            env = os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)
            spec = pair.strong.model_copy(update={'iters': 5})
            step(
                'cublas-check@strong-teacher',
                lambda: train_teacher(
                    spec,
                    data,
                    train.model_copy(update={'checkpoint_interval': 5}),
                    runtime,
                    launch,
                    out=str(work / 'cublas_check' / 'strong'),
                    loss_log=str(work / 'cublas_check' / 'strong.csv'),
                    identity={'kind': 'teacher'},
                    where='cuBLAS check',
                ),
            )
            if env is not None:
                os.environ['CUBLAS_WORKSPACE_CONFIG'] = env
            summary['cublas_check'] = summary['errors'].pop('cublas-check@strong-teacher', 'no error')[-600:]

        from dfmsd.engine.teachers import train_teacher

        for role in ('weak', 'strong'):
            spec = getattr(pair, role).model_copy(update={'iters': args.teacher_iters})
            step(
                f'teacher@{pair_name}-{role}',
                lambda spec=spec, role=role: train_teacher(
                    spec,
                    data,
                    train,
                    runtime,
                    launch,
                    out=str(teachers[role]),
                    loss_log=str(logs / 'teachers' / pair_name / f'{role}.csv'),
                    identity={'kind': 'teacher', 'pair': pair_name, 'role': role},
                    where=f'pairs.{pair_name}.{role}',
                ),
            )

        def boxes_and_table():
            from dfmsd.data.me import decision_table
            from dfmsd.evaluation import teacher_area_ratios

            box_dir = base / 'data' / 'me' / pair_name / 'boxes'
            teacher_area_ratios(
                teachers['weak'],
                data=data,
                score_thr=p.me.teacher_score_thr,
                runtime=runtime,
                launch=launch,
                out=box_dir,
            )
            ratios = {int(k): float(v) for k, v in read_json(box_dir / 'area_ratios.json')['area_ratios'].items()}
            table = decision_table(ratios, p.me, seed=seed)
            write_json(me_table, table, indent=None)
            summary['me_counts'] = table['counts']

        step(f'teacher_boxes@{pair_name}', boxes_and_table)

        from dfmsd.engine.students import init_student

        step(
            f'student_init@{student_name}-{seed}',
            lambda: init_student(student, data, seed, str(init), f'students.{student_name}'),
        )

    from dfmsd.core.kinds import run_kind
    from dfmsd.engine.students import distill_student, train_baseline

    sdir = models / 'students' / student_name / f'seed{seed}'
    if args.reuse:
        sdir = work / 'models' / 'students' / student_name / f'seed{seed}'
    ldir = logs / 'students' / student_name / f'seed{seed}'
    identity = {'student': student_name, 'seed': seed}
    trained: dict[str, Path] = {}

    def wanted(name):
        return not args.only or name in args.only

    if wanted('baseline'):
        label = f'baseline@{student_name}-{seed}'
        if step(
            label,
            lambda: train_baseline(
                student,
                data,
                train,
                runtime,
                launch,
                seed=seed,
                init=str(init),
                out=str(sdir / 'baseline'),
                loss_log=str(ldir / 'baseline.csv'),
                identity={'kind': 'baseline', **identity},
            ),
        ):
            trained[label] = sdir / 'baseline'

    def distill(kind, group, name, method, teacher_dir, init_dir, out_dir, table):
        label = f'{kind}@{student_name}-{pair_name}-{name}-{seed}'
        ok = step(
            label,
            lambda: distill_student(
                kind=run_kind(kind),
                method=method,
                student=student,
                data=data,
                train=train,
                distill=p.distill,
                runtime=runtime,
                launch=launch,
                seed=seed,
                teacher=str(teacher_dir),
                init=str(init_dir),
                me_table=str(table) if table else None,
                out=str(out_dir),
                loss_log=str(ldir / pair_name / f'{out_dir.name}.csv'),
                identity={'kind': kind, **identity, 'pair': pair_name, 'method': name, 'group': group},
            ),
        )
        if ok:
            trained[label] = out_dir
        summary['runs'][label]['teacher_role'] = 'weak' if kind == 'sal1' else 'strong'
        return ok

    for name, method in p.methods.items():
        if wanted(name):
            distill('distill', 'methods', name, method, teachers['strong'], init, sdir / pair_name / name, None)
    for name, method in p.me_methods.items():
        if wanted(name):
            distill(
                'distill_me', 'me_methods', name, method, teachers['strong'], init, sdir / pair_name / name, me_table
            )
    for name, method in p.sal_methods.items():
        if wanted(name):
            stage1 = sdir / pair_name / f'{name}.stage1'
            if distill(
                'sal1',
                'sal_methods',
                name,
                method,
                teachers['weak'],
                init,
                stage1,
                me_table if 1 in method.me_stages else None,
            ):
                distill(
                    'sal2',
                    'sal_methods',
                    name,
                    method,
                    teachers['strong'],
                    stage1,
                    sdir / pair_name / name,
                    me_table if 2 in method.me_stages else None,
                )

    # the floor of each distillation row: the student's step (baseline) + the teacher's forward
    baseline_label = f'baseline@{student_name}-{seed}'
    train_py = sdir / 'baseline' / 'train.py'
    if torch.cuda.is_available() and train_py.is_file():
        for role, tdir in teachers.items():
            try:
                summary[f'teacher_forward_ms_{role}'] = round(1e3 * teacher_forward_time(tdir, train_py, args.amp), 2)
            except Exception as err:  # noqa: BLE001
                summary['errors'][f'teacher_forward_{role}'] = ''.join(traceback.format_exception(err))[-3000:]
        base_ms = summary['runs'].get(baseline_label, {}).get('step_median_ms')
        for run in summary['runs'].values():
            role = run.get('teacher_role')
            t_ms = summary.get(f'teacher_forward_ms_{role}')
            if role and base_ms and t_ms and run.get('step_median_ms'):
                run['floor_ms'] = round(base_ms + t_ms, 2)
                run['ratio_to_floor'] = round(run['step_median_ms'] / run['floor_ms'], 2)
        save()

    if not args.skip_eval:
        from dfmsd.evaluation import evaluate_model

        models_to_eval = dict(trained)
        if not args.reuse:
            models_to_eval.update(
                {f'teacher@{pair_name}-{r}': d for r, d in teachers.items() if (d / 'model.pth').is_file()}
            )
        for label, model_dir in models_to_eval.items():
            elabel = 'evaluate:' + label
            rel = Path(*model_dir.parts[len(model_dir.parts) - model_dir.parts[::-1].index('models') :])

            def run_eval(model_dir=model_dir, rel=rel, elabel=elabel):
                rec = evaluate_model(
                    model_dir,
                    data=data,
                    evaluate=p.evaluate,
                    runtime=runtime,
                    launch=launch,
                    predictions=str(work / 'predictions' / rel),
                    metrics=str(metrics / f'{rel}.json'),
                )
                summary['runs'][elabel]['test'] = rec['test']
                summary['runs'][elabel]['val_mAP'] = rec['val']['mAP']
                summary['runs'][elabel]['metrics_finite'] = all(
                    math.isfinite(v) for s in ('val', 'test') for v in rec[s].values()
                )

            summary['runs'].setdefault(elabel, {})
            step(elabel, run_eval)

    save()
    print('\nrun | device | iters | step ms (median) | data ms | floor ms | ratio | peak MiB | finite | wall s')
    for label, r in summary['runs'].items():
        print(
            f'{label} | {r.get("device", r.get("test_device", "-"))} | {r.get("iters_timed", "-")} | '
            f'{r.get("step_median_ms", "-")} | {r.get("data_median_ms", "-")} | {r.get("floor_ms", "-")} | '
            f'{r.get("ratio_to_floor", "-")} | {round(r["peak_mem_mib"]) if r.get("peak_mem_mib") else "-"} | '
            f'{r.get("losses_finite", r.get("metrics_finite", "-"))} | {r.get("wall_s")}'
            + (f' | test mAP {r["test"]["mAP"]}' if r.get('test') else '')
        )
    print('teacher forward ms:', {k: v for k, v in summary.items() if k.startswith('teacher_forward')})
    print('errors:', list(summary['errors']) or 'none')
    return 1 if summary['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
