"""Where a teacher comes from: trained here, the MMDetection model zoo, or a local checkpoint.

Downloaded and local checkpoints are verified against their sha256 (a full digest from
params, or the prefix in the model index's file name) before anything unpickles them, and
re-exported as tensor-only ``model.pth``, so nothing downstream reads an unverified pickle.
"""

from __future__ import annotations

from pathlib import Path

from mmengine.config import Config

from dfmsd.core.io import write_json, write_text
from dfmsd.core.params import Data, Launch, LocalTeacher, Runtime, Train, TrainedTeacher, ZooTeacher
from dfmsd.engine.checkpoint import export_plain_checkpoint, load_verified, state_dict_of
from dfmsd.engine.configs import point_at_dataset, register_project_types, resolve_config, training_config
from dfmsd.engine.launch import apply_launcher, maybe_relaunch
from dfmsd.engine.training import log, train_and_export


def train_teacher(
    spec: TrainedTeacher,
    data: Data,
    train: Train,
    runtime: Runtime,
    launch: Launch,
    *,
    out: str,
    loss_log: str,
    identity: dict,
    where: str,
) -> None:
    maybe_relaunch(launch)
    register_project_types()

    cfg = training_config(spec, data, train, spec.iters, train.teacher_seed, where)
    apply_launcher(cfg, launch)
    train_and_export(cfg, out_dir=out, student_cfg=cfg, loss_csv=loss_log, threads=runtime.threads, identity=identity)


def import_teacher(
    spec: ZooTeacher | LocalTeacher, data: Data, out: str, loss_log: str, identity: dict, where: str
) -> None:
    """Verify, unpickle and re-export a downloaded or local teacher (nothing is trained)."""
    if isinstance(spec, ZooTeacher):
        from dfmsd.engine.download import fetch_zoo_teacher
        from dfmsd.engine.zoo import find_teacher_model

        model = find_teacher_model(spec.zoo, f'{where}.zoo')
        path = fetch_zoo_teacher(spec.zoo, Path('~/.cache/dfmsd/zoo').expanduser(), sha256=spec.sha256)
        checkpoint = load_verified(path, 'cpu', sha256=spec.sha256 or model.sha256_prefix)
        cfg, source = Config.fromfile(model.config), {'zoo': model.name, 'url': model.url}
    else:  # the user's own file: its errors name its keys, not a stage to rerun
        checkpoint = load_verified(spec.checkpoint, 'cpu', sha256=spec.sha256, key=where)
        cfg, source = Config.fromfile(resolve_config(spec.config, f'{where}.config')), {'file': spec.checkpoint}
    point_at_dataset(cfg, data)
    out_dir = Path(out)
    meta = {**source, 'dataset_meta': {'classes': list(cfg.train_dataloader.dataset.metainfo['classes'])}}
    export_plain_checkpoint(state_dict_of(checkpoint), out_dir / 'model.pth', meta=meta)
    cfg.dump(str(out_dir / 'model.py'))
    write_json(
        out_dir / 'run.json',
        {**identity, 'iters': 0, 'images_seen': 0, 'views_seen': 0, 'teacher_images': 0, 'source': source},
    )
    write_text(loss_log, 'iter,loss\n')  # nothing trained; DVC declares the log as a plot output
    log(f'{where}: verified {source} -> {out_dir}/model.pth')
