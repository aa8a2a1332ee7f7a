"""DVC stages `distill@<run>` and `distill_me@<run>`: one distillation training run.

`python stages/distill.py <run> [--me]` trains the student of params `distill.runs.<run>`
(or `distill.me_runs.<run>` with --me, adding the masking-enhanced copies and the ME
loss) from that run's teacher. Writes models/<run>.pth, a plain student checkpoint that
stock mmdet loads with models/student.py, and logs/<run>.csv.
"""
import argparse

from dfmsd import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('run', help="a key of params.yaml 'distill.runs' (or 'distill.me_runs')")
    parser.add_argument('--me', action='store_true', help='train with the ME dataset and loss')
    args = parser.parse_args()

    from dfmsd.configs import distill_config
    from dfmsd.launch import apply_launcher, maybe_relaunch
    from dfmsd.params import load_params
    from dfmsd.training import train_and_export
    params = load_params()
    maybe_relaunch(params)  # more than one process configured: re-run this command under torchrun
    import dfmsd.models  # noqa: F401
    cfg, student_cfg = distill_config(params, args.run, me_data_root='data/augmented' if args.me else None)
    apply_launcher(cfg, params)
    train_and_export(cfg, name=args.run, out_checkpoint=f'models/{args.run}.pth',
                     out_config=f'models/{args.run}.py', loss_csv=f'logs/{args.run}.csv',
                     export_cfg=student_cfg, export_prefix='student.')


if __name__ == '__main__':
    cli.run(main)
