"""The calibration protocol of params.yaml's loss weights: each distillation term's size against
the detection loss at the start of training, on validation images, with the trained teachers.

    python benchmarks/loss_scale.py [--preset NAME] [--batches 8]

Needs the teachers and the seed-0 student initialisation (`python -m flows --target
teacher --target student_init`). For each method and each of its loss terms it prints the
term's mean over ``--batches`` val batches, its ratio to the detection loss, and the weight
that would make that ratio ``--target`` (terms are linear in their weight). SAL methods are
measured with the strong teacher, as their stage-2 terms and the single-stage rows are
(``--teacher weak``: as their stage-1 terms, for the alpha-per-stage ablation); the ME term with
the same weights on the ME views. The val split is what anything tuned may read;
the tables report test.
"""

from __future__ import annotations

import argparse
import copy
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--params', default='params.yaml')
    parser.add_argument('--preset')
    parser.add_argument('--batches', type=int, default=8)
    parser.add_argument('--target', type=float, default=1.0, help='wanted ratio to the detection loss')
    parser.add_argument(
        '--teacher', choices=('strong', 'weak'), default='strong', help="weak: SAL stage 1's terms (alpha per stage)"
    )
    args = parser.parse_args()

    import torch
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmengine.runner import set_random_seed

    import dfmsd.models  # noqa: F401
    from dfmsd.core.params import METHOD_GROUPS, load_params, validate
    from dfmsd.core.presets import preset_params
    from dfmsd.data.coco import ground_truth_ratios, load_json, split_files
    from dfmsd.data.me import decision_table
    from dfmsd.engine.configs import detector_config, probe_size_of, with_me_views
    from dfmsd.report.loading import distill_term

    init_default_scope('mmdet')
    params = validate(preset_params(args.preset, args.params)) if args.preset else load_params(args.params)
    torch.set_num_threads(params.runtime.threads)
    pair_name = next(iter(params.pairs))
    student_name, student = next(iter(params.students.items()))
    teacher_dir = Path(f'models/teachers/{pair_name}/{args.teacher}')
    init = Path(f'models/students/{student_name}/seed{params.seeds[0]}/init/model.pth')
    missing = [p for p in (teacher_dir / 'model.pth', init) if not p.is_file()]
    if missing:
        raise SystemExit(
            f'missing {", ".join(map(str, missing))}: run `python -m flows --target teacher '
            f'--target student_init` first'
        )
    scfg = detector_config(student, params.data, f'students.{student_name}')
    # val images, with ME views decided from their ground-truth r(I)
    val = copy.deepcopy(scfg)
    val.train_dataloader.dataset.update(
        ann_file=params.data.splits['val'].ann, data_prefix=dict(img=params.data.splits['val'].img)
    )
    ratios = ground_truth_ratios(load_json(split_files(params.data, 'val')[0]))
    table = decision_table(ratios, params.me, seed=0)
    table_path = Path('/tmp/dfmsd_loss_scale_me.json')
    import json

    table_path.write_text(json.dumps(table))
    with_me_views(val, str(table_path))
    set_random_seed(0)  # the training pipeline's random flips and crops: the same batches every run
    ds = DATASETS.build(val.train_dataloader.dataset)
    bs = params.train.batch_size
    batches = [pseudo_collate([ds[(b * bs + i) % len(ds)] for i in range(bs)]) for b in range(args.batches)]
    print(f'{args.batches} val batches of {bs}; {args.teacher} teacher {teacher_dir}; student {init}')
    for group in METHOD_GROUPS:
        for name, method in getattr(params, group).items():
            uses_me = group != 'methods' and method.aug_loss_weight > 0
            torch.manual_seed(0)
            model = MODELS.build(
                dict(
                    type='StageDistiller',
                    student=copy.deepcopy(scfg.model),
                    teacher=dict(config=str(teacher_dir / 'model.py'), checkpoint=str(teacher_dir / 'model.pth')),
                    losses={k: v.model_dump(exclude_none=True) for k, v in method.losses.items()},
                    aug_loss_weight=method.aug_loss_weight if uses_me else 0.0,
                    seed=0,
                    min_cells=params.distill.min_cells,
                    probe_size=probe_size_of(params.data, scfg),
                    student_init=str(init),
                )
            )
            model.init_weights()
            model.train()
            sums: dict[str, float] = defaultdict(float)
            with torch.no_grad():
                for batch in batches:
                    _, log_vars = model.parse_losses(model(**model.data_preprocessor(batch, True), mode='loss'))
                    for key, value in log_vars.items():
                        if key == 'loss':
                            continue
                        term = distill_term(key) or 'det'
                        sums[term] += float(value) / len(batches)
            det = sums.pop('det')
            weights = {k: v.loss_weight for k, v in method.losses.items()}
            parts = []
            for term, value in sorted(sums.items()):
                weight = method.aug_loss_weight if term == 'aug' else weights.get(term)
                hint = f', weight for {args.target:g}x: {weight * args.target * det / value:.3g}' if weight else ''
                parts.append(f'{term} {value:.4f} ({value / det:.2f}x det{hint})')
            print(f'{group}.{name}: det {det:.3f} | ' + ' | '.join(parts))


if __name__ == '__main__':
    main()
