"""The reviewer's path (docs/reviewing.md, flows/review.py) on a fresh clone.

A small real DVC project shaped like the pipeline (a ``data`` stage whose output DVC does not
cache, cached models and predictions, metrics in git, ``reports/summary.json``) is run and
pushed by a maintainer, then cloned, pulled and reviewed:

* over DVC's SSH remote against a real OpenSSH server on 127.0.0.1 that the test starts (host
  and user keys made with ssh-keygen in tmp; skipped when /usr/sbin/sshd is missing, which
  .ci/run installs); with the server stopped the review says the remote is unreachable and
  offers the rebuild, which gives the same metrics;
* without any remote, with a local-directory remote that does not exist on this machine, and
  for a commit whose metrics were edited by hand (not reproduced).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import REPO, run

pytestmark = pytest.mark.timeout(300)

SSHD = Path('/usr/sbin/sshd')

#: A stage command: every output is a digest of its inputs, so a rerun is byte-identical.
STEP_PY = '''\
"""A fake stage: its outputs are digests of its inputs (deterministic, byte-identical on a rerun)."""
import argparse, hashlib, json, os, pathlib, sys

p = argparse.ArgumentParser()
p.add_argument('kind')
p.add_argument('--in', dest='inputs', action='append', default=[])
p.add_argument('--out', action='append', default=[])
p.add_argument('--metrics', action='append', default=[])
a = p.parse_args()
h = hashlib.sha256(a.kind.encode())
for name in a.inputs:
    path = pathlib.Path(name)
    for f in sorted(path.rglob('*') if path.is_dir() else [path]):
        if f.is_file():
            h.update(f.as_posix().encode() + f.read_bytes())
digest = h.hexdigest()
for out in a.out:
    d = pathlib.Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / 'weights.bin').write_bytes(bytes.fromhex(digest) * 64)
for m in a.metrics:
    pathlib.Path(m).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(m).write_text(json.dumps({'mAP': int(digest[:6], 16) / 2**24, 'kind': a.kind}, indent=1) + '\\n')
'''

DVC_YAML = """\
stages:
  data:
    cmd: python step.py data --out data/synthetic
    deps: [step.py]
    outs: [data/synthetic: {persist: true, cache: false}]
  train:
    cmd: python step.py train --in data/synthetic --out models/small
    deps: [step.py, data/synthetic]
    outs: [models/small]
  evaluate:
    cmd: python step.py eval --in models/small --out predictions/small --metrics metrics/students/small.json
    deps: [step.py, models/small]
    outs: [predictions/small, metrics/students/small.json: {cache: false}]
  report:
    cmd: python step.py report --in metrics --metrics reports/summary.json
    deps: [step.py, metrics]
    metrics: [reports/summary.json: {cache: false}]
"""
METRICS = ['metrics/students/small.json', 'reports/summary.json']
CACHED = ['models/small/weights.bin', 'predictions/small/weights.bin']
GIT = ['git', '-c', 'user.email=test@dfmsd', '-c', 'user.name=test']


def dvc(root: Path, *args: str, check: bool = True, **env):
    return run([sys.executable, '-m', 'dvc', *args], root, check=check, timeout=120, **env)


def review(clone: Path, *args: str, **env):
    """``python -m flows.review`` on ``clone``, as `make review` runs it (from this checkout's flows)."""
    return run(
        [sys.executable, '-m', 'flows.review', '--repo', str(clone), *args], REPO, check=False, timeout=240, **env
    )


def make_pipeline(root: Path) -> Path:
    """The maintainer's side: a git + DVC project, its pipeline run, its results committed."""
    root.mkdir(parents=True)
    (root / 'step.py').write_text(STEP_PY)
    (root / 'dvc.yaml').write_text(DVC_YAML)
    (root / '.gitignore').write_text('/data/synthetic\n/models\n/predictions\n')
    subprocess.run(['git', 'init', '-q'], cwd=root, check=True)
    dvc(root, 'init', '-q')
    dvc(root, 'config', 'core.analytics', 'false')
    dvc(root, 'repro', '-q')
    return root


@pytest.fixture(scope='module')
def pipeline_master(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp('pipeline') / 'src')


@pytest.fixture
def pipeline(pipeline_master, tmp_path):
    """The maintainer's project, its pipeline run, nothing committed or pushed yet (a private copy)."""
    return shutil.copytree(pipeline_master, tmp_path / 'src', symlinks=True)


def commit(root: Path, message: str) -> None:
    subprocess.run(GIT + ['add', '-A'], cwd=root, check=True)
    subprocess.run(GIT + ['commit', '-qm', message], cwd=root, check=True)


def clone(src: Path, dest: Path) -> Path:
    subprocess.run(['git', 'clone', '-q', str(src), str(dest)], check=True, capture_output=True)
    return dest


def assert_reproduced(res, src: Path, dest: Path, how: str) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f'[review] reproduced: {len(METRICS)} metrics files identical to commit' in res.stdout, res.stdout
    assert f'(outputs {how})' in res.stdout
    assert 'Traceback' not in res.stdout + res.stderr
    for rel in METRICS + CACHED:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes(), rel
    status = dvc(dest, 'status', '--json')
    assert json.loads(status.stdout) == {}, status.stdout
    assert subprocess.run(['git', 'status', '--porcelain'], cwd=dest, capture_output=True, text=True).stdout == ''


def assert_offers_rebuild(res, *needles: str) -> None:
    out = res.stdout
    assert res.returncode == 2, out[-3000:] + res.stderr[-3000:]
    assert '[review] cannot pull: ' in out
    for needle in needles:
        assert needle in out, out
    assert 'docs/reviewing.md' in out and 'python -m flows.review --rebuild' in out, out
    assert 'Traceback' not in out + res.stderr


# ---------------------------------------------------------------- an OpenSSH server on loopback
def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class SshServer:
    """``sshd -D`` on 127.0.0.1 as the current user, keys and config in ``base``."""

    def __init__(self, base: Path):
        self.base = base
        base.mkdir(parents=True)
        for key in ('host_key', 'user_key'):
            subprocess.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f', str(base / key)], check=True)
        shutil.copy(base / 'user_key.pub', base / 'authorized_keys')
        self.port = free_port()
        self.user = getpass.getuser()
        (base / 'sshd_config').write_text(
            textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            HostKey {base}/host_key
            AuthorizedKeysFile {base}/authorized_keys
            PidFile {base}/sshd.pid
            StrictModes no
            UsePAM no
            PubkeyAuthentication yes
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            Subsystem sftp internal-sftp
            """)
        )
        self.proc: subprocess.Popen | None = None

    def known_hosts_line(self) -> str:
        return f'[127.0.0.1]:{self.port} ' + ' '.join((self.base / 'host_key.pub').read_text().split()[:2])

    def start(self) -> None:
        if os.geteuid() == 0:  # sshd run as root wants its privilege separation directory
            Path('/run/sshd').mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(SSHD),
                '-D',
                '-f',
                str(self.base / 'sshd_config'),
                '-p',
                str(self.port),
                '-E',
                str(self.base / 'sshd.log'),
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.base / 'sshd.log').read_text() if (self.base / 'sshd.log').exists() else ''
                raise AssertionError(f'sshd exited with {self.proc.returncode}: {log}')
            try:
                socket.create_connection(('127.0.0.1', self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError('sshd did not listen within 20 s')

    def stop(self) -> None:
        """The listener and its per-connection children (its own process group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def sshd(tmp_path):
    if not SSHD.is_file() or not shutil.which('ssh-keygen'):
        pytest.skip(
            'OpenSSH server not installed (/usr/sbin/sshd): apt-get install openssh-server (.ci/run does it in CI)'
        )
    server = SshServer(tmp_path / 'sshd')
    server.start()
    yield server
    server.stop()


def test_pull_over_ssh_reproduces_and_an_unreachable_server_offers_the_rebuild(tmp_path, sshd, pipeline):
    home = tmp_path / 'home'  # the reviewer's and maintainer's ~ (known_hosts, no ~/.ssh/config)
    (home / '.ssh').mkdir(parents=True)
    env = {'HOME': str(home)}
    url = f'ssh://127.0.0.1:{sshd.port}{tmp_path}/remote'
    key = str(sshd.base / 'user_key')

    # the maintainer: the shared remote in .dvc/config (committed), the login in config.local; push
    src = pipeline
    dvc(src, 'remote', 'add', '-d', 'shared', url)
    dvc(src, 'remote', 'modify', '--local', 'shared', 'user', sshd.user)
    dvc(src, 'remote', 'modify', '--local', 'shared', 'keyfile', key)
    pushed = dvc(src, 'push', **env)
    assert 'files pushed' in pushed.stdout, pushed.stdout
    assert any(p.is_file() for p in (tmp_path / 'remote').rglob('*'))  # on the server's disk
    commit(src, 'results')

    # the reviewer: a fresh clone, their own login
    mine = clone(src, tmp_path / 'review')
    dvc(mine, 'remote', 'modify', '--local', 'shared', 'user', sshd.user)
    dvc(mine, 'remote', 'modify', '--local', 'shared', 'keyfile', key)

    # DVC itself does not check host keys: the review does, before DVC connects
    res = review(mine, **env)
    assert_offers_rebuild(res, "DVC remote 'shared'", 'host key is not trusted', 'known_hosts')
    assert not (mine / 'models').exists()

    (home / '.ssh' / 'known_hosts').write_text(sshd.known_hosts_line() + '\n')
    res = review(mine, **env)
    assert_reproduced(res, src, mine, 'pulled')
    assert "[review] dvc pull from DVC remote 'shared'" in res.stdout
    assert '[review] reran after the pull: data (outputs not cached by DVC' in res.stdout
    assert 'note: ran although' not in res.stdout  # every cached stage came from the remote

    # the server goes away: another fresh clone cannot pull, is told so, and may rebuild
    sshd.stop()
    other = clone(src, tmp_path / 'review2')
    dvc(other, 'remote', 'modify', '--local', 'shared', 'user', sshd.user)
    dvc(other, 'remote', 'modify', '--local', 'shared', 'keyfile', key)
    res = review(other, **env)
    assert_offers_rebuild(res, f"DVC remote 'shared' ({url}) is unreachable", f'127.0.0.1:{sshd.port}')
    assert not (other / 'models').exists() and not (other / 'data').exists()  # nothing ran
    res = review(other, '--rebuild', **env)
    assert_reproduced(res, src, other, 'rebuilt')


@pytest.fixture
def pushed_to_directory(tmp_path, pipeline):
    """A project pushed to a local-directory remote (the one-machine set-up), results committed."""
    src = pipeline
    dvc(src, 'remote', 'add', '-d', 'shared', str(tmp_path / 'remote'))
    dvc(src, 'push')
    commit(src, 'results')
    return src


def test_review_without_a_remote_says_so_and_rebuilds_on_request(tmp_path, pipeline):
    src = pipeline
    commit(src, 'results')
    mine = clone(src, tmp_path / 'review')
    res = review(mine)
    assert_offers_rebuild(res, 'no DVC remote is configured', 'dvc remote add -d --local')
    assert not (mine / 'models').exists()
    assert_reproduced(review(mine, '--rebuild'), src, mine, 'rebuilt')


def test_a_directory_remote_missing_on_this_machine_is_unreachable(tmp_path, pushed_to_directory):
    mine = clone(pushed_to_directory, tmp_path / 'review')
    dvc(mine, 'remote', 'modify', '--local', 'shared', 'url', str(tmp_path / 'elsewhere'))
    res = review(mine)
    assert_offers_rebuild(res, f'the directory {tmp_path / "elsewhere"} does not exist on this machine')
    dvc(mine, 'remote', 'modify', '--local', '--unset', 'shared', 'url')  # back to the committed directory
    assert_reproduced(review(mine), pushed_to_directory, mine, 'pulled')


def test_metrics_edited_by_hand_are_not_reproduced(tmp_path, pushed_to_directory):
    src = pushed_to_directory
    doctored = json.loads((src / 'metrics/students/small.json').read_text())
    doctored['mAP'] += 0.05
    (src / 'metrics/students/small.json').write_text(json.dumps(doctored, indent=1) + '\n')
    commit(src, 'better numbers')
    mine = clone(src, tmp_path / 'review')
    res = review(mine)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    assert '[review] NOT reproduced: a run differs from commit' in res.stdout, res.stdout
    assert 'metrics/students/small.json: differs, with no mAP to judge it by (mAP: ' in res.stdout
    assert 'note: ran although the pull should have provided them: evaluate' in res.stdout
