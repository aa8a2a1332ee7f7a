"""Seconds per training step of each model in params.yaml, and each distillation method's
cost relative to the plain student, measured in one run on this machine.

    python benchmarks/step_time.py [--steps 10] [--params params.yaml]

Needs data (`dvc repro data`) and, for the distillation rows, the teachers' checkpoints
(`dvc repro teacher`); rows whose inputs are missing are skipped with a note.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def seconds_per_step(model, batch, steps: int) -> float:
    import torch
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        data = model.data_preprocessor(batch, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        optim.zero_grad()
        loss.backward()
        optim.step()

    step()  # warm-up: allocations, lazy init
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=10)
    parser.add_argument('--params', default='params.yaml')
    args = parser.parse_args()

    import torch
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.engine.configs import build_model_config, distill_config, model_entry
    from dfmsd.core.params import load_params
    init_default_scope('mmdet')
    torch.manual_seed(0)
    params = load_params(args.params)
    data = params['data']
    student_cfg = build_model_config(model_entry(params, 'student'), data_root=data['root'],
                                     image_size=data.get('image_size'))
    ds = DATASETS.build(student_cfg.train_dataloader.dataset)
    batch = pseudo_collate([ds[i] for i in range(int(params['train']['batch_size']))])
    print(f"batch {len(batch['inputs'])} at {data.get('image_size')} px, {args.steps} steps each, "
          f'{torch.get_num_threads()} threads')

    times = {}
    for name in ['student', *params.get('teachers', {})]:
        cfg = build_model_config(model_entry(params, name), data_root=data['root'],
                                 image_size=data.get('image_size'))
        times[name] = seconds_per_step(MODELS.build(cfg.model), batch, args.steps)
        print(f'{name:24s} {times[name]:.3f} s/step')
    runs = params.get('distill', {}).get('runs', {})
    for run_name, run in runs.items():
        if not Path(f"models/{run['teacher']}.pth").is_file():
            print(f'{run_name:24s} skipped: models/{run["teacher"]}.pth missing (dvc repro teacher)')
            continue
        cfg, _ = distill_config(params, run_name)
        cfg.model.student_init = None
        t = seconds_per_step(MODELS.build(cfg.model), batch, args.steps)
        print(f'{run_name:24s} {t:.3f} s/step  ({t / times["student"]:.2f}x the plain student)')


if __name__ == '__main__':
    main()
