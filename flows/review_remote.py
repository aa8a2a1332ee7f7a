"""The review's DVC remote (:mod:`flows.review`): is a default one configured and reachable
(an SSH server's host key checked against ``~/.ssh/known_hosts``, which DVC does not do, and
its login tried), and ``dvc pull`` from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from flows.review_metrics import ReviewError
from flows.stages import subprocess_env

#: Seconds to wait for a remote to answer.
CONNECT_TIMEOUT = 10


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'dvc', *args],
        cwd=root,
        env=subprocess_env(root),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def dvc_config(root: Path) -> dict[str, str]:
    """DVC's merged config (system, global, project, ``--local``), later levels winning."""
    res = dvc(root, 'config', '--list', '--show-origin')
    if res.returncode != 0:
        raise ReviewError(f'`dvc config --list` failed: {(res.stderr or res.stdout).strip()}')
    config = {}
    for line in res.stdout.splitlines():
        entry = line.split('\t', 1)[-1]
        if '=' in entry:
            key, value = entry.split('=', 1)
            config[key.strip()] = value.strip()
    return config


def remote_problem(root: Path, config: dict[str, str]) -> tuple[str | None, str | None]:
    """(the default remote's name, None) when it can be pulled from, else (name, why not)."""
    name = config.get('core.remote')
    if not name:
        remotes = sorted({k.split('.')[1] for k in config if k.startswith('remote.') and k.endswith('.url')})
        if remotes:
            return None, (
                f'no default DVC remote is set (configured: {", ".join(remotes)}; '
                f'make one the default: dvc remote default --local {remotes[0]})'
            )
        return None, 'no DVC remote is configured, so there is nothing to pull from'
    url = config.get(f'remote.{name}.url')
    if not url:
        return name, f"the default DVC remote '{name}' has no url (dvc remote modify --local {name} url <url>)"
    parts = urlsplit(url)
    if parts.scheme == 'ssh':
        return name, ssh_problem(
            name, url, {k.split('.', 2)[2]: v for k, v in config.items() if k.startswith(f'remote.{name}.')}
        )
    if parts.scheme in ('', 'file') or (len(parts.scheme) == 1 and os.name == 'nt'):
        path = Path(parts.path if parts.scheme == 'file' else url)
        path = path if path.is_absolute() else root / path
        if not path.is_dir():
            return name, (
                f"DVC remote '{name}' ({url}) is unreachable: the directory {path} does not exist on this machine"
            )
    return name, None  # another kind of remote (s3, gs, http...): `dvc pull` tells


def ssh_problem(name: str, url: str, options: dict[str, str]) -> str | None:
    """Reach the SSH server, check its host key against ~/.ssh/known_hosts, and log in."""
    parts = urlsplit(url)
    host = parts.hostname or ''
    port = int(options.get('port') or parts.port or 22)
    user = options.get('user') or parts.username
    where = f"DVC remote '{name}' ({url})"
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return f'{where} is unreachable: {host}:{port} does not answer ({reason})'

    import asyncssh

    keyfile = options.get('keyfile')
    login = {
        'username': user,
        'port': port,
        'connect_timeout': CONNECT_TIMEOUT,
        'passphrase': options.get('passphrase'),
        'password': options.get('password'),
    }
    if keyfile:
        login['client_keys'] = [os.path.expanduser(keyfile)]

    async def probe() -> None:
        async with asyncssh.connect(host, **{k: v for k, v in login.items() if v is not None}):
            pass

    who = f'{user or "you"}@{host}' + (f' with key {keyfile}' if keyfile else '')
    try:
        asyncio.run(probe())
    except asyncssh.HostKeyNotVerifiable as err:
        return (
            f"{where}: the server's host key is not trusted ({err.reason}). DVC does not check SSH host "
            f"keys, so this command does: check the key with the server's admin and add it to "
            f'~/.ssh/known_hosts (e.g. `ssh -p {port} {user + "@" if user else ""}{host} true`, which asks)'
        )
    except asyncssh.PermissionDenied:
        if any(options.get(f'ask_{what}', '').lower() == 'true' for what in ('password', 'passphrase')):
            return None  # the host key checked out; `dvc pull` asks for the password itself
        return (
            f'{where} refused the login as {who}: set the user and key with '
            f'`dvc remote modify --local {name} user <name>` and `... keyfile <path>`'
        )
    except (TimeoutError, OSError, asyncssh.Error) as err:
        reason = getattr(err, 'reason', None) or str(err) or type(err).__name__
        return f'{where} is unreachable: {reason}'
    return None


def pull(root: Path, verbose: bool) -> str | None:
    """``dvc pull``; None when it succeeded, else why not."""
    proc = subprocess.Popen(
        [sys.executable, '-m', 'dvc', 'pull'],
        cwd=root,
        env=subprocess_env(root),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for raw in proc.stdout:
            line = raw.rstrip('\n').split('\r')[-1].rstrip()
            if line:
                lines.append(line)
                if verbose or not line.startswith(('Collecting', 'Fetching', 'Building', 'Checking out')):
                    print(f'  [dvc pull] {line}', flush=True)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code != 0:
        tail = '\n'.join(f'    {line}' for line in lines[-8:])
        return f'`dvc pull` exited with {code}:\n{tail}'
    return None


def uncached_stages(root: Path) -> set[str]:
    """Stages none of whose outputs DVC caches (they rerun after a pull, by design)."""
    try:
        from dvc.repo import Repo

        with contextlib.chdir(root), Repo('.') as repo:  # stage addresses as `dvc dag` in root names them
            return {s.addressing for s in repo.index.stages if s.outs and not any(o.use_cache for o in s.outs)}
    except Exception:  # noqa: BLE001 - only used to word the report
        return set()
