"""Multi-GPU / multi-node training through torchrun and mmengine's `pytorch` launcher.

params.yaml (absent = one process):

    launch: {nproc_per_node: 1, nnodes: 1, node_rank: 0, master_addr: 127.0.0.1,
             master_port: 29500, backend: nccl}

A training stage keeps its plain DVC command (`python stages/train.py <name>`,
`python stages/distill.py <run>`). When more than one process is configured, the stage
re-executes itself under `python -m torch.distributed.run ... <script> <args>`
(:func:`maybe_relaunch`; os.execv, so torchrun's exit status is the stage's), and each
worker turns its mmengine config into a distributed one (:func:`apply_launcher`). Only
rank 0 writes the exported checkpoint, config and loss log (dfmsd.training).

Every key can be overridden per machine with an environment variable
`DFMSD_LAUNCH_<KEY>` (e.g. `DFMSD_LAUNCH_NODE_RANK=1` on the second node), so that all
nodes share one params.yaml. `launch` is not a DVC parameter of any stage: how a run is
spread over devices does not change what it computes (the global batch is
`train.batch_size` x world size; set batch size and learning rate for the world size
you run with).
"""
from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from dfmsd.params import ParamsError

DEFAULTS: dict[str, Any] = dict(nproc_per_node=1, nnodes=1, node_rank=0, master_addr='127.0.0.1',
                                master_port=29500, backend='nccl')
_INT_KEYS = ('nproc_per_node', 'nnodes', 'node_rank', 'master_port')
ENV_PREFIX = 'DFMSD_LAUNCH_'


def launch_settings(params: dict[str, Any]) -> dict[str, Any]:
    """`params['launch']` over the defaults, then `DFMSD_LAUNCH_<KEY>` overrides; validated."""
    given = params.get('launch') or {}
    if not isinstance(given, dict):
        raise ParamsError(f"params.yaml: 'launch' must be a mapping, got {given!r}")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ParamsError(f"params.yaml: unknown key(s) launch.{', launch.'.join(unknown)} "
                          f"(known: {', '.join(DEFAULTS)})")
    settings = {**DEFAULTS, **given}
    for key in DEFAULTS:
        env = os.environ.get(ENV_PREFIX + key.upper())
        if env not in (None, ''):
            settings[key] = env
    for key in _INT_KEYS:
        try:
            settings[key] = int(settings[key])
        except (TypeError, ValueError):
            raise ParamsError(f'params.yaml: launch.{key} must be an integer, got {settings[key]!r}') from None
    if settings['nproc_per_node'] < 1 or settings['nnodes'] < 1:
        raise ParamsError(f"params.yaml: launch.nproc_per_node and launch.nnodes must be >= 1, got "
                          f"{settings['nproc_per_node']} and {settings['nnodes']}")
    if not 0 <= settings['node_rank'] < settings['nnodes']:
        raise ParamsError(f"params.yaml: launch.node_rank {settings['node_rank']} is not in "
                          f"[0, nnodes={settings['nnodes']})")
    settings['master_addr'] = str(settings['master_addr'])
    settings['backend'] = str(settings['backend'])
    return settings


def world_size(params: dict[str, Any]) -> int:
    settings = launch_settings(params)
    return settings['nproc_per_node'] * settings['nnodes']


def in_worker() -> bool:
    """True inside a process started by torchrun (or torch.distributed.launch)."""
    return 'LOCAL_RANK' in os.environ


def torchrun_command(params: dict[str, Any], argv: list[str] | None = None) -> list[str]:
    """`python -m torch.distributed.run <launch settings> <script> <args>` for `argv`."""
    s = launch_settings(params)
    argv = list(sys.argv if argv is None else argv)
    return [sys.executable, '-m', 'torch.distributed.run',
            '--nproc_per_node', str(s['nproc_per_node']), '--nnodes', str(s['nnodes']),
            '--node_rank', str(s['node_rank']), '--master_addr', s['master_addr'],
            '--master_port', str(s['master_port']), *argv]


def maybe_relaunch(params: dict[str, Any], argv: list[str] | None = None) -> None:
    """Re-execute this stage under torchrun when more than one process is configured.

    Returns (doing nothing) for a single process or inside a torchrun worker; otherwise
    it never returns: the process becomes torchrun, whose exit status is the stage's.
    """
    if world_size(params) <= 1 or in_worker():
        return
    cmd = torchrun_command(params, argv)
    print(f'[launch] {shlex.join(cmd)}', flush=True)
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def _uses_me_data(cfg: Any) -> bool:
    model = cfg.get('model') or {}
    dataset = (cfg.get('train_dataloader') or {}).get('dataset') or {}
    return (model.get('type') == 'StageDistiller' and float(model.get('aug_loss_weight') or 0) > 0) \
        or dataset.get('type') == 'ConcatDataset'


def apply_launcher(cfg: Any, params: dict[str, Any]) -> bool:
    """Inside a torchrun worker, make `cfg` a distributed mmengine config; else no-op.

    Sets `launcher='pytorch'`, `env_cfg.dist_cfg.backend` and the DDP wrapper. ME runs
    (original + masking-enhanced images in one ConcatDataset) get
    `find_unused_parameters=True`: a batch with no augmented (or no original) image leaves
    the corresponding loss branch's parameters without gradients. Without CUDA (the CPU
    gloo set-up the tests use) the process group is started here, because mmengine's
    init_dist calls torch.cuda.set_device, and DDP gets no device_ids. Returns whether
    the config was changed.
    """
    if not in_worker():
        return False
    import torch
    settings = launch_settings(params)
    backend = settings['backend']
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    cfg.launcher = 'pytorch'
    # a new dict: configs copied from this one (the exported student config) share env_cfg
    cfg.env_cfg = {**(cfg.get('env_cfg') or {}), 'dist_cfg': dict(backend=backend)}
    wrapper = dict(type='MMDistributedDataParallel', broadcast_buffers=False,
                   find_unused_parameters=_uses_me_data(cfg))
    if not torch.cuda.is_available():
        if backend == 'nccl':
            raise ParamsError("params.yaml: launch.backend 'nccl' needs CUDA GPUs; use 'gloo' on CPU")
        wrapper['device_ids'] = None  # a CPU module: DDP refuses device ids
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
    cfg.model_wrapper_cfg = wrapper
    print(f"[launch] rank {rank}/{world} (node {settings['node_rank']}, local rank "
          f"{os.environ['LOCAL_RANK']}), backend {backend}, "
          f"find_unused_parameters={wrapper['find_unused_parameters']}", flush=True)
    return True


def single_process_config(cfg: Any) -> Any:
    """A copy of `cfg` without the launcher and DDP wrapper, as written next to a checkpoint
    (evaluation and stock mmdet load it in one process)."""
    out = cfg.copy()
    for key in ('launcher', 'model_wrapper_cfg'):
        out.pop(key, None)
    return out
