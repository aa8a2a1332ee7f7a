"""DVC stage `student_init`: the seeded random initialisation every student run starts from.

Baseline, single-stage baselines and SAL stage 1 all start from this one file, so their
differences come from the training signal, not from the draw of initial weights.
"""
from dfmsd import cli


def main() -> None:
    import dfmsd.models  # noqa: F401  (registers project modules)
    from mmdet.registry import MODELS
    from mmengine.runner import set_random_seed
    from mmengine.registry import init_default_scope

    from dfmsd.checkpoint import export_plain_checkpoint
    from dfmsd.configs import student_config
    from dfmsd.params import load_params
    params = load_params()
    cfg = student_config(params)
    init_default_scope('mmdet')
    set_random_seed(int(params.get('seed', 0)), deterministic=True)
    model = MODELS.build(cfg.model)
    model.init_weights()
    export_plain_checkpoint(model.state_dict(), 'models/student_init.pth', meta={'name': 'student_init'})
    cfg.dump('models/student_init.py')
    print('[student_init] wrote models/student_init.pth and models/student_init.py')


if __name__ == '__main__':
    cli.run(main)
