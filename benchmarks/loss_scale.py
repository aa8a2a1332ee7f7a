"""Size of each distillation term against the detection loss at initialisation, per run.

    python benchmarks/loss_scale.py [--batches 4]

Loss weights in params.yaml are set from this: the paper's values assume 256-channel
FPN features of 800 px images, so with the sum-over-elements reductions of MGD/DMKD they
do not carry over to small presets. Needs data and teacher checkpoints (`dvc repro teacher`).
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batches', type=int, default=4)
    parser.add_argument('--params', default='params.yaml')
    args = parser.parse_args()

    import torch
    from mmdet.registry import DATASETS, MODELS
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope

    import dfmsd.models  # noqa: F401
    from dfmsd.engine.configs import distill_config
    from dfmsd.core.params import load_params
    init_default_scope('mmdet')
    params = load_params(args.params)
    distill = params['distill']
    bs = int(params['train']['batch_size'])
    runs = {**distill.get('runs', {}), **distill.get('me_runs', {})}
    for run_name, run in runs.items():
        me = run_name in distill.get('me_runs', {})
        missing = [p for p in (f"models/{run['teacher']}.pth", run.get('init') or '',
                               'data/augmented' if me else '') if p and not Path(p).exists()]
        if missing:
            print(f'{run_name:14s} skipped: {", ".join(missing)} missing (dvc repro first)')
            continue
        cfg, _ = distill_config(params, run_name, me_data_root='data/augmented' if me else None)
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
        model.init_weights()
        ds = DATASETS.build(cfg.train_dataloader.dataset)
        stride = max(1, len(ds) // (args.batches * bs))  # spread over the set (and both halves with ME)
        sums: dict[str, float] = defaultdict(float)
        with torch.no_grad():
            for b in range(args.batches):
                batch = pseudo_collate([ds[(b * bs + i) * stride % len(ds)] for i in range(bs)])
                _, log_vars = model.parse_losses(model(**model.data_preprocessor(batch, True), mode='loss'))
                for k, v in log_vars.items():
                    group = 'det' if not k.startswith('loss_distill') else k.rsplit('_s', 1)[0][5:]
                    if k != 'loss':
                        sums[group] += float(v) / args.batches
        det = sums.pop('det')
        parts = ', '.join(f'{k} {v:.3f} ({v / det:.2f}x det)' for k, v in sorted(sums.items()))
        print(f'{run_name:14s} det {det:.3f} | {parts}')


if __name__ == '__main__':
    main()
