"""Each method's distillation step against its cost floor, measured in one run.

    python benchmarks/step_time.py [--preset NAME] [--rounds 7] [--steps 3] [--profile METHOD]

Method: process CPU time (not wall clock: other load moves wall times by 3x here), with
``runtime.threads`` torch threads, random weights (the cost of a step does not depend on
them), one batch of the training split; the variants are timed in interleaved rounds and
the median per variant is reported.

The floor of a distillation step is what any distillation of that row must do: one plain
student training step plus one teacher forward pass over the batch; for a row with ME
views, also the student's backbone + neck forward and backward and the teacher's forward on
the views. ``losses`` times the method's own loss modules alone (forward + backward on
stored features): what the method adds by construction (DMKD's two generation blocks, ...).
``overhead`` = step - floor - losses is what neither the floor nor the method explains:
the distiller's own work. ``--profile METHOD`` then runs torch.profiler over that method's
step and over the floor's parts, and prints where the step's extra CPU time goes, per op.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def cpu_seconds(fn, steps: int) -> float:
    start = time.process_time()
    for _ in range(steps):
        fn()
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--params', default='params.yaml')
    parser.add_argument('--preset')
    parser.add_argument('--rounds', type=int, default=7)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument(
        '--profile', metavar='METHOD', help='also print the per-op excess of this method over its floor'
    )
    args = parser.parse_args()

    from dfmsd.core import numerics

    numerics.pin()  # the stages' code paths (DFMSD_NUMERICS=native: the libraries' own choice)
    import torch
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.core.params import METHOD_GROUPS, load_params, validate
    from dfmsd.core.presets import preset_params
    from dfmsd.data.me import decision_table
    from dfmsd.engine.configs import detector_config, probe_size_of, with_me_views
    from dfmsd.models.distiller import views_batch

    init_default_scope('mmdet')
    params = validate(preset_params(args.preset, args.params)) if args.preset else load_params(args.params)
    known = [name for group in METHOD_GROUPS for name in getattr(params, group)]
    if args.profile and args.profile not in known:
        parser.error(f'--profile {args.profile}: not a method of these params ({", ".join(known)})')
    torch.set_num_threads(params.runtime.threads)
    torch.manual_seed(0)
    pair_name, pair = next(iter(params.pairs.items()))
    student_name, student = next(iter(params.students.items()))
    scfg = detector_config(student, params.data, f'students.{student_name}')
    tcfg = detector_config(pair.strong, params.data, f'pairs.{pair_name}.strong')
    tcfg.dump('/tmp/dfmsd_bench_teacher.py')
    probe = probe_size_of(params.data, scfg)

    # one batch with ME views: decisions from the ground truth's r(I) (the cost does not depend on who decides)
    import json
    import tempfile

    from dfmsd.data.coco import ground_truth_ratios, load_json, split_files

    ratios = ground_truth_ratios(load_json(split_files(params.data, 'train')[0]))
    table = decision_table(ratios, params.me, seed=0)
    table_file = tempfile.NamedTemporaryFile('w', suffix='.json', delete=False)
    json.dump(table, table_file)
    table_file.close()
    me_cfg = copy.deepcopy(scfg)
    with_me_views(me_cfg, table_file.name)
    ds = DATASETS.build(me_cfg.train_dataloader.dataset)
    batch = pseudo_collate([ds[i] for i in range(params.train.batch_size)])
    views = views_batch(batch['data_samples'])
    n_views = 0 if views is None else len(views['inputs'])
    print(
        f'{params.runtime.threads} thread(s), batch {len(batch["inputs"])} + {n_views} ME views, '
        f'{params.train.batch_size} images at {params.data.image_size} px; CPU seconds per step, median of '
        f'{args.rounds} interleaved rounds of {args.steps} steps'
    )

    def trainer(model, data_of):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model.train()

        def step():
            loss, _ = model.parse_losses(model(**data_of(model), mode='loss'))
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    student_model = MODELS.build(copy.deepcopy(scfg.model))
    teacher = MODELS.build(copy.deepcopy(tcfg.model)).eval()

    def teacher_forward(raw):
        def run():
            with torch.no_grad():
                teacher.extract_feat(teacher.data_preprocessor(raw, False)['inputs'])

        return run

    def student_views_step():
        feats = student_model.extract_feat(student_model.data_preprocessor(views, True)['inputs'])
        sum(f.mean() for f in feats).backward()

    variants = {
        'student step': trainer(student_model, lambda m: m.data_preprocessor(batch, True)),
        'teacher forward': teacher_forward(batch),
    }
    if views is not None:
        variants['student on views'] = student_views_step
        variants['teacher on views'] = teacher_forward(views)
    rows = {}
    for group in METHOD_GROUPS:
        for name, method in getattr(params, group).items():
            uses_me = group == 'me_methods' or (group == 'sal_methods' and 2 in method.me_stages)
            distiller = MODELS.build(
                dict(
                    type='StageDistiller',
                    student=copy.deepcopy(scfg.model),
                    teacher=dict(config='/tmp/dfmsd_bench_teacher.py', checkpoint=None),
                    losses={k: v.model_dump(exclude_none=True) for k, v in method.losses.items()},
                    aug_loss_weight=method.aug_loss_weight if uses_me else 0.0,
                    min_cells=params.distill.min_cells,
                    probe_size=probe,
                )
            )
            variants[name] = trainer(distiller, lambda m: m.data_preprocessor(batch, True))
            variants[f'{name} losses'] = losses_only(distiller, batch, views if uses_me else None)
            rows[name] = uses_me and views is not None
    for fn in variants.values():
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for key, fn in variants.items():
            times[key].append(cpu_seconds(fn, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med['student step'] + med['teacher forward']
    me_floor = floor + med.get('student on views', 0.0) + med.get('teacher on views', 0.0)
    print(
        f'student step {med["student step"]:.3f}  teacher forward {med["teacher forward"]:.3f}  floor {floor:.3f}'
        + (
            f'  views: student {med["student on views"]:.3f} teacher {med["teacher on views"]:.3f} '
            f'-> ME floor {me_floor:.3f}'
            if views is not None
            else ''
        )
    )
    print(f'{"method":16s} {"step":>7s} {"floor":>7s} {"ratio":>6s} {"losses":>7s} {"overhead":>9s}')
    for name, uses_me in rows.items():
        f = me_floor if uses_me else floor
        step, own = med[name], med[f'{name} losses']
        print(f'{name:16s} {step:7.3f} {f:7.3f} {step / f:6.2f} {own:7.3f} {(step - f - own) / f:+8.1%}')
    if args.profile:
        floor_parts = ['student step', 'teacher forward']
        if rows[args.profile]:
            floor_parts += ['student on views', 'teacher on views']
        print_excess_by_op(
            args.profile, variants[args.profile], [variants[k] for k in floor_parts], args.rounds * args.steps
        )


def self_cpu_ms_by_op(fns, steps: int) -> dict[str, float]:
    """torch.profiler's self CPU time per op name, per step, summed over ``fns``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            for fn in fns:
                fn()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def print_excess_by_op(name: str, step, floor_fns, steps: int, top: int = 15) -> None:
    method = self_cpu_ms_by_op([step], steps)
    floor = self_cpu_ms_by_op(floor_fns, steps)
    excess = {op: method.get(op, 0.0) - floor.get(op, 0.0) for op in method.keys() | floor.keys()}
    total_m, total_f = sum(method.values()), sum(floor.values())
    print(
        f'\n{name} under torch.profiler, {steps} steps: self CPU ms per step {total_m:.1f} vs floor {total_f:.1f} '
        f'(excess {total_m - total_f:+.1f}); the {top} ops with the largest excess:'
    )
    print(f'{"op":44s} {name:>9s} {"floor":>9s} {"excess":>9s}')
    for op in sorted(excess, key=lambda k: -abs(excess[k]))[:top]:
        print(f'{op[:44]:44s} {method.get(op, 0.0):9.2f} {floor.get(op, 0.0):9.2f} {excess[op]:+9.2f}')


def losses_only(distiller, batch, views):
    """Forward + backward of the method's loss modules alone, on stored features."""
    import torch

    with torch.no_grad():
        data = distiller.student.data_preprocessor(batch, True)
        s_feats = distiller.student.extract_feat(data['inputs'])
        t_feats = distiller._teacher_feats(batch)
        samples = data['data_samples']
        if views is not None:
            sv = distiller.student.extract_feat(distiller.student.data_preprocessor(views, True)['inputs'])
            tv = distiller._teacher_feats(views)
    feats = [(s_feats, t_feats)] + ([(sv, tv)] if views is not None else [])

    def run():
        total = 0.0
        for index, (s_all, t_all) in enumerate(feats):
            s_all = [s.detach().requires_grad_(True) for s in s_all]
            if 'student_head_out' in distiller.needs:  # PCD: the head's outputs on these features,
                distiller.student.bbox_head(s_all)  # recorded by the distiller's hook (so counted here too)
            terms = distiller.distillation_losses(s_all, t_all, samples, 0)
            if index:  # the views: the ME loss's modules alone
                terms = {k: v for k, v in terms.items() if k.startswith(f'loss_distill_{distiller.aug_loss_name}_s')}
            total = total + sum(terms.values())
        total.backward()

    return run


if __name__ == '__main__':
    main()
