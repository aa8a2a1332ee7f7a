"""DVC stages `teacher@<name>` and `baseline`: train a detector from ground truth.

`python stages/train.py <teacher name>` trains that teacher, or, for a `zoo:` entry,
downloads and verifies the model-zoo checkpoint instead. `python stages/train.py
student` trains the baseline student from models/student_init.pth.
Writes models/<name>.pth (stock mmdet checkpoint), models/<name>.py, logs/<name>.csv.
"""
import argparse

from dfmsd import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('name', help="a key of params.yaml 'teachers', or 'student'")
    args = parser.parse_args()

    from dfmsd.configs import apply_training_params, build_model_config, data_layout, model_entry, split_files
    from dfmsd.data import validate_coco
    from dfmsd.launch import apply_launcher, in_worker, maybe_relaunch
    from dfmsd.params import load_params
    from dfmsd.training import train_and_export
    params = load_params()
    entry = model_entry(params, args.name)
    if 'zoo' in entry:  # downloaded, not trained: one process, and a loss log with no rows
        from pathlib import Path

        from dfmsd.teachers import fetch_teacher
        fetch_teacher(args.name, entry, params)
        Path('logs').mkdir(exist_ok=True)
        Path(f'logs/{args.name}.csv').write_text('iter,loss\n')  # DVC declares it a plot output
        return
    data = params['data']
    if not in_worker():  # checked once, before a multi-process launch; its workers skip it
        for split in ('train', 'val'):
            validate_coco(*split_files(data, split))
    maybe_relaunch(params)  # more than one process configured: re-run this command under torchrun
    import dfmsd.models  # noqa: F401
    cfg = build_model_config(entry, data_root=data['root'], image_size=data.get('image_size'),
                             name=args.name, layout=data_layout(data))
    apply_training_params(cfg, params, int(entry['iters']))
    if args.name == 'student':
        cfg.load_from = 'models/student_init.pth'
    apply_launcher(cfg, params)
    train_and_export(cfg, name=args.name, out_checkpoint=f'models/{args.name}.pth',
                     out_config=f'models/{args.name}.py', loss_csv=f'logs/{args.name}.csv')


if __name__ == '__main__':
    cli.run(main)
