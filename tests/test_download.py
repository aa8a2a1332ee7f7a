"""Verified downloads (dfmsd.engine.download) against a loopback HTTP server started by the
tests, and verified unpickling (dfmsd.engine.checkpoint.load_verified).

Nothing here leaves 127.0.0.1: the fixture serves bytes from a dict on an ephemeral
port and is shut down at the end of every test.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dfmsd.core.errors import CheckpointError, DownloadError
from dfmsd.core.io import sha256_file
from dfmsd.engine import download as dl
from dfmsd.engine import zoo
from dfmsd.engine.download import download_verified

pytestmark = [pytest.mark.timeout(60), pytest.mark.fast]

TIMEOUT = 5  # client socket timeout for every download in this file


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ loopback server


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)
    # path -> K: the FIRST request for the path sends K body bytes of the announced
    # length, then the connection is closed (a dropped connection).
    drop_first_after: dict[str, int] = field(default_factory=dict)
    # path -> K: EVERY response sends at most K body bytes, then closes.
    truncate_every: dict[str, int] = field(default_factory=dict)
    # path -> absolute offset: every response stops at this byte of the file (no progress).
    stall_at: dict[str, int] = field(default_factory=dict)
    # paths whose first request is hung up on before any response is written
    hangup_first: set[str] = field(default_factory=set)
    ignore_range: set[str] = field(default_factory=set)
    # paths answered with a 206 that starts at byte 0 whatever Range asked for
    range_from_zero: set[str] = field(default_factory=set)
    status_for: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path: str | None = None) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if path is None or p == path)

    def ranges(self, path: str) -> list[str | None]:
        with self.lock:
            return [r for p, r in self.requests if p == path]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.0'  # one request per connection, closed after the response
    state: ServerState  # set on the per-fixture subclass

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        st = self.state
        rng = self.headers.get('Range')
        with st.lock:
            st.requests.append((self.path, rng))
            nth = sum(1 for p, _ in st.requests if p == self.path)
        if self.path in st.hangup_first and nth == 1:
            self.close_connection = True
            return  # no status line at all
        if self.path in st.status_for:
            self.send_error(st.status_for[self.path])
            return
        data = st.files.get(self.path)
        if data is None:
            self.send_error(404)
            return

        start, status = 0, 200
        if rng and self.path not in st.ignore_range:
            m = re.fullmatch(r'bytes=(\d+)-(\d*)', rng.strip())
            assert m, rng
            start = 0 if self.path in st.range_from_zero else int(m.group(1))
            end = int(m.group(2)) if m.group(2) else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header('Content-Range', f'bytes */{len(data)}')
                self.send_header('Content-Length', '0')
                self.end_headers()
                return
            body = data[start : end + 1]
            status = 206
        else:
            body = data
        self.send_response(status)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(len(body)))
        if status == 206:
            self.send_header('Content-Range', f'bytes {start}-{start + len(body) - 1}/{len(data)}')
        self.end_headers()

        limit = len(body)
        if self.path in st.drop_first_after and nth == 1:
            limit = min(limit, st.drop_first_after[self.path])
        if self.path in st.truncate_every:
            limit = min(limit, st.truncate_every[self.path])
        if self.path in st.stall_at:
            limit = min(limit, max(0, st.stall_at[self.path] - start))
        self.wfile.write(body[:limit])
        self.wfile.flush()
        self.close_connection = True


@dataclass
class Server:
    base: str
    state: ServerState

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(dl, '_BACKOFF_BASE_S', 0.0)
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    state = ServerState()
    handler = type('Handler', (_Handler,), {'state': state})
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield Server(f'http://127.0.0.1:{httpd.server_address[1]}', state)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
        assert not thread.is_alive()


PAYLOAD = os.urandom(300_000) + b'tail'  # a few chunks' worth; not a multiple of anything
P_SHA = sha(PAYLOAD)


def fetch(server: Server, path: str, dest: Path, **kw) -> Path:
    kw.setdefault('progress', False)
    kw.setdefault('timeout', TIMEOUT)
    return download_verified(server.url(path), dest, **kw)


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# ------------------------------------------------------------------------ tests


def test_sha256_file(tmp_path):
    p = tmp_path / 'f'
    p.write_bytes(PAYLOAD)
    assert sha256_file(p) == P_SHA
    assert sha256_file(p, chunk=7) == P_SHA


@pytest.mark.parametrize('how', ['full', 'prefix', 'both'])
def test_good_file_downloads_and_verifies(server, tmp_path, how):
    server.state.files['/m.pth'] = PAYLOAD
    kw = {
        'full': {'sha256': P_SHA},
        'prefix': {'sha256_prefix': P_SHA[:8]},
        'both': {'sha256': P_SHA.upper(), 'sha256_prefix': P_SHA[:8]},
    }[how]
    dest = tmp_path / 'sub' / 'm.pth'
    out = fetch(server, '/m.pth', dest, **kw)
    assert out == dest and dest.read_bytes() == PAYLOAD
    assert leftovers(dest.parent) == ['m.pth']
    assert server.state.ranges('/m.pth') == [None]


def test_progress_bar_path(server, tmp_path, capsys):
    server.state.files['/m.pth'] = PAYLOAD
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA, progress=True)
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD
    assert capsys.readouterr().out == ''  # the bar goes to stderr only


def test_cached_file_makes_no_request(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    dest = tmp_path / 'm.pth'
    fetch(server, '/m.pth', dest, sha256=P_SHA)
    assert server.state.count() == 1
    fetch(server, '/m.pth', dest, sha256=P_SHA)
    fetch(server, '/m.pth', dest, sha256_prefix=P_SHA[:8])
    # not even a HEAD / connection: an unreachable URL works too
    download_verified('http://127.0.0.1:9/never', dest, sha256=P_SHA, progress=False)
    assert server.state.count() == 1


def test_existing_dest_that_does_not_verify_is_replaced(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    dest = tmp_path / 'm.pth'
    dest.write_bytes(b'corrupt')
    fetch(server, '/m.pth', dest, sha256=P_SHA)
    assert dest.read_bytes() == PAYLOAD and server.state.count() == 1


@pytest.mark.parametrize('kw', [{'sha256': '0' * 64}, {'sha256_prefix': 'deadbeef'}])
def test_wrong_hash_raises_and_leaves_nothing(server, tmp_path, kw):
    server.state.files['/m.pth'] = PAYLOAD
    with pytest.raises(DownloadError) as ei:
        fetch(server, '/m.pth', tmp_path / 'm.pth', **kw)
    msg = str(ei.value)
    assert server.url('/m.pth') in msg and P_SHA in msg and next(iter(kw.values())) in msg
    assert leftovers(tmp_path) == []


def test_dropped_connection_resumes_with_range(server, tmp_path):
    k = 123_457
    server.state.files['/m.pth'] = PAYLOAD
    server.state.drop_first_after['/m.pth'] = k
    dest = tmp_path / 'm.pth'
    fetch(server, '/m.pth', dest, sha256_prefix=P_SHA[:8])
    assert server.state.ranges('/m.pth') == [None, f'bytes={k}-']
    assert sha256_file(dest) == P_SHA and leftovers(tmp_path) == ['m.pth']


def test_hangup_before_response_is_retried(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    server.state.hangup_first.add('/m.pth')
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA)
    assert server.state.ranges('/m.pth') == [None, None]
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD


def test_truncated_bodies_are_resumed_piecewise(server, tmp_path):
    # every response stops after 100 kB although Content-Length says more
    server.state.files['/m.pth'] = PAYLOAD
    server.state.truncate_every['/m.pth'] = 100_000
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA, retries=3)
    assert server.state.ranges('/m.pth') == [None, 'bytes=100000-', 'bytes=200000-', 'bytes=300000-']
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD


def test_truncation_without_progress_gives_clear_error_and_keeps_part(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    server.state.stall_at['/m.pth'] = 50_000
    dest = tmp_path / 'm.pth'
    with pytest.raises(DownloadError, match=r'after 3 attempt\(s\).*ended at byte 50000 of 300004'):
        fetch(server, '/m.pth', dest, sha256=P_SHA, retries=2)
    assert server.state.count() == 3
    assert not dest.exists()
    part = tmp_path / 'm.pth.part'
    assert part.read_bytes() == PAYLOAD[:50_000]  # kept for a later resume
    # the next call (server healthy again) resumes from the kept part
    del server.state.stall_at['/m.pth']
    fetch(server, '/m.pth', dest, sha256=P_SHA)
    assert server.state.ranges('/m.pth')[-1] == 'bytes=50000-'
    assert dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == ['m.pth']


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    server.state.ignore_range.add('/m.pth')
    (tmp_path / 'm.pth.part').write_bytes(b'x' * 1000)  # garbage leftover
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA)
    assert server.state.ranges('/m.pth') == ['bytes=1000-']
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD and leftovers(tmp_path) == ['m.pth']


def test_wrong_range_is_not_spliced_in(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    server.state.range_from_zero.add('/m.pth')
    (tmp_path / 'm.pth.part').write_bytes(PAYLOAD[:1000])
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA)
    assert server.state.ranges('/m.pth') == ['bytes=1000-', None]
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD and leftovers(tmp_path) == ['m.pth']


def test_416_with_oversized_part_restarts(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    (tmp_path / 'm.pth.part').write_bytes(PAYLOAD + b'extra')
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA)
    assert server.state.ranges('/m.pth') == [f'bytes={len(PAYLOAD) + 5}-', None]
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD


def test_416_with_complete_part_just_verifies(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    (tmp_path / 'm.pth.part').write_bytes(PAYLOAD)
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA)
    assert server.state.ranges('/m.pth') == [f'bytes={len(PAYLOAD)}-']
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD and leftovers(tmp_path) == ['m.pth']


def test_stale_part_that_fails_hash_is_refetched_once_from_zero(server, tmp_path):
    server.state.files['/m.pth'] = PAYLOAD
    (tmp_path / 'm.pth.part').write_bytes(b'\0' * 4096)  # right length prefix, wrong bytes
    fetch(server, '/m.pth', tmp_path / 'm.pth', sha256=P_SHA)
    assert server.state.ranges('/m.pth') == ['bytes=4096-', None]
    assert (tmp_path / 'm.pth').read_bytes() == PAYLOAD and leftovers(tmp_path) == ['m.pth']


@pytest.mark.parametrize('code', [404, 403, 500])
def test_http_error_status_raises_and_leaves_nothing(server, tmp_path, code):
    path = '/missing.pth' if code == 404 else '/m.pth'
    if code != 404:
        server.state.files[path] = PAYLOAD
        server.state.status_for[path] = code
    (tmp_path / 'm.pth.part').write_bytes(b'old')  # a 4xx/5xx does not keep a part around
    with pytest.raises(DownloadError, match=rf'HTTP {code}\b.*{re.escape(server.url(path))}'):
        fetch(server, path, tmp_path / 'm.pth', sha256=P_SHA, retries=2)
    assert leftovers(tmp_path) == []
    # 4xx: no retry; 500: transient, retried
    assert server.state.count(path) == (3 if code == 500 else 1)


def test_connection_refused_keeps_nothing_and_names_url(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, '_BACKOFF_BASE_S', 0.0)
    import socket

    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    url = f'http://127.0.0.1:{port}/m.pth'
    with pytest.raises(DownloadError, match=re.escape(url)):
        download_verified(url, tmp_path / 'm.pth', sha256=P_SHA, progress=False, timeout=TIMEOUT, retries=1)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize('kw', [{}, {'sha256': None, 'sha256_prefix': ''}])
def test_unverifiable_download_is_refused(server, tmp_path, kw):
    server.state.files['/m.pth'] = PAYLOAD
    with pytest.raises(DownloadError, match='unverifiable'):
        fetch(server, '/m.pth', tmp_path / 'm.pth', **kw)
    assert server.state.count() == 0 and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    'kw',
    [
        {'sha256': 'abc'},
        {'sha256_prefix': 'xyz12345'},
        {'sha256_prefix': 'abc'},
        {'sha256': P_SHA, 'sha256_prefix': '00000000'},
    ],
)
def test_malformed_or_inconsistent_hashes_are_refused(server, tmp_path, kw):
    server.state.files['/m.pth'] = PAYLOAD
    with pytest.raises(DownloadError):
        fetch(server, '/m.pth', tmp_path / 'm.pth', **kw)
    assert server.state.count() == 0


# ------------------------------------------------------------------------ load_verified


class _Boom:
    """Unpickling this creates the marker file (stands in for arbitrary code execution)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_load_verified_with_numpy(tmp_path):
    import numpy as np
    import torch

    from dfmsd.engine.checkpoint import load_verified

    ckpt = {
        'state_dict': {'w': torch.arange(6.0).reshape(2, 3)},
        'meta': {'arr': np.arange(4, dtype=np.int64), 'epoch': 24},
    }
    p = tmp_path / 'c.pth'
    torch.save(ckpt, p)
    digest = sha256_file(p)
    for expected in (digest, digest[:8], digest.upper()):
        out = load_verified(p, sha256=expected)
        assert torch.equal(out['state_dict']['w'], ckpt['state_dict']['w'])
        assert isinstance(out['meta']['arr'], np.ndarray) and out['meta']['arr'].tolist() == [0, 1, 2, 3]
        assert out['meta']['epoch'] == 24


def test_tampered_checkpoint_is_not_unpickled(tmp_path):
    import torch

    from dfmsd.engine.checkpoint import load_verified, record_hash

    marker = tmp_path / 'PWNED'
    p = tmp_path / 'c.pth'
    torch.save({'meta': _Boom(str(marker))}, p)
    assert not marker.exists()
    digest = sha256_file(p)
    # sanity: the payload really does fire when unpickled (only after verification)
    load_verified(p, sha256=digest)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError, match='refusing to unpickle'):
        load_verified(p)  # neither a digest nor a .sha256 sidecar
    with pytest.raises(CheckpointError, match='refusing to unpickle'):
        load_verified(p, sha256=digest[:7])  # a true prefix, but too short to mean anything
    record_hash(p)  # the sidecar a training state gets
    load_verified(p)
    marker.unlink()

    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF  # tamper
    p.write_bytes(bytes(raw))
    for kw in ({'sha256': digest}, {'sha256': digest[:8]}, {}):  # the pinned digest, its prefix, the sidecar
        with pytest.raises(CheckpointError, match='refusing to unpickle') as err:
            load_verified(p, **kw)
        assert str(p) in str(err.value) and sha256_file(p) in str(err.value)
    assert not marker.exists()


def test_load_verified_of_a_missing_file(tmp_path):
    from dfmsd.engine.checkpoint import load_verified

    with pytest.raises(CheckpointError, match='does not exist'):
        load_verified(tmp_path / 'absent.pth', sha256='0' * 64)


# ------------------------------------------------------------------ fetch_zoo_teacher


def test_fetch_zoo_teacher_uses_index_prefix_and_cache_dir(server, tmp_path, monkeypatch):
    name = 'retinanet_r50_fpn_1x_coco_20200130-' + P_SHA[:8] + '.pth'
    server.state.files['/v2.0/retinanet/' + name] = PAYLOAD
    fake = zoo.ZooModel(
        name='retinanet_r50_fpn_1x_coco',
        config='/nonexistent/cfg.py',
        url=server.url('/v2.0/retinanet/' + name),
        sha256_prefix=P_SHA[:8],
        box_ap=36.5,
    )
    monkeypatch.setattr(zoo, 'find_model', lambda query: fake)
    out = dl.fetch_zoo_teacher('retinanet_r50_fpn_1x_coco', tmp_path / 'cache')
    assert out == tmp_path / 'cache' / name and out.read_bytes() == PAYLOAD
    # full sha256 from params: used (and cached file verifies without a request)
    assert dl.fetch_zoo_teacher('retinanet_r50_fpn_1x_coco', tmp_path / 'cache', sha256=P_SHA) == out
    assert server.state.count() == 1
    # a pinned sha256 contradicting the index prefix is refused
    with pytest.raises(DownloadError, match='inconsistent'):
        dl.fetch_zoo_teacher('retinanet_r50_fpn_1x_coco', tmp_path / 'cache', sha256='f' * 64)


def test_fetch_zoo_teacher_unquotes_file_name(server, tmp_path, monkeypatch):
    quoted = f'/v2.0/reppoints/r50_gn-neck%2Bhead_2x_coco_20200329-{P_SHA[:8]}.pth'
    server.state.files[quoted] = PAYLOAD
    fake = zoo.ZooModel(
        name='rp', config='/nonexistent/cfg.py', url=server.url(quoted), sha256_prefix=P_SHA[:8], box_ap=None
    )
    monkeypatch.setattr(zoo, 'find_model', lambda q: fake)
    out = dl.fetch_zoo_teacher('rp', tmp_path)
    assert out.name == f'r50_gn-neck+head_2x_coco_20200329-{P_SHA[:8]}.pth'
    assert out.read_bytes() == PAYLOAD
