"""Verified, resumable downloads of model checkpoints (standard library HTTP only).

Every file fetched here is checked against a SHA-256 digest -- the full digest when
one is known, otherwise the hex prefix embedded in OpenMMLab / torch.hub file names
(``<name>_<date>-<first 8 hex digits of sha256>.pth``). Files that cannot be checked
are refused.

Download protocol (:func:`download_verified`)
---------------------------------------------
* ``dest`` already present and verifying -> returned as is, no network access at all.
* Otherwise the body is streamed into ``<dest>.part`` in the same directory. A
  leftover ``.part`` is resumed with ``Range: bytes=<size>-``:

  - ``206`` whose ``Content-Range`` starts at ``<size>`` -> appended;
  - ``200`` (server ignored ``Range``) -> the part file is rewritten from byte zero;
  - ``416`` -> if ``Content-Range: bytes */<total>`` says the part already holds the
    whole file it goes straight to verification, otherwise it is discarded and the
    download restarts from zero.

* Connection-level failures (refused / reset / timed out, a response that ends before
  ``Content-Length`` or the ``Content-Range`` total) and the transient statuses 429,
  500, 502, 503, 504 are retried up to ``retries`` more times, each retry resuming
  from whatever is on disk.
* The complete body is hashed; on a match it is moved onto ``dest`` with
  :func:`os.replace` (atomic: ``dest`` is never a partial file). If the body was
  assembled from a resumed ``.part`` and does not match, the stale part is dropped and
  the file is fetched once more from zero before giving up.

Which failures leave a ``.part`` behind
---------------------------------------
Only a failure that is a *network interruption* (connection error, timeout, truncated
body -- i.e. what resuming is for) keeps the ``.part`` so that the next call resumes.
A hash mismatch, or an HTTP error status (any 4xx, or a 5xx still failing after the
retries), deletes it. ``dest`` itself is only ever created by the final atomic rename
of a verified file.

Unpickling policy
-----------------
Checkpoints are pickles. The project's rule is that only files whose SHA-256 has been
verified are ever unpickled with full pickle (``torch.load(weights_only=False)``);
:func:`dfmsd.engine.checkpoint.load_verified` is the one place that does it.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from dfmsd.core.errors import DownloadError
from dfmsd.core.io import sha256_file

__all__ = [
    'download_verified',
    'fetch_zoo_teacher',
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
#: Statuses worth retrying (the .part is kept between those retries).
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
#: Seconds slept before retry ``n`` is ``_BACKOFF_BASE_S * 2 ** (n - 1)`` (capped);
#: tests set it to 0.
_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 30.0
_USER_AGENT = 'dfmsd-download/0.1 (+urllib)'
_HEX = re.compile(r'^[0-9a-f]+$')
_CONTENT_RANGE = re.compile(r'^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$', re.I)
_CONTENT_RANGE_UNSAT = re.compile(r'^\s*bytes\s+\*/(\d+)\s*$', re.I)

# Exceptions that mean "the network let us down": retried, and the .part is kept.
_NETWORK_ERRORS = (
    ConnectionError,  # reset / refused / aborted, incl. http.client.RemoteDisconnected
    TimeoutError,  # == socket.timeout on 3.10+
    socket.timeout,
    http.client.IncompleteRead,
    http.client.HTTPException,
    ssl.SSLError,
)


class _Truncated(Exception):
    """The response ended before the announced size (retryable network failure)."""


class _HTTPStatus(Exception):
    """Non-success HTTP status; ``transient`` tells whether a retry may help."""

    def __init__(self, code: int, reason: str):
        super().__init__(f'HTTP {code} {reason}'.strip())
        self.code = code
        self.transient = code in _TRANSIENT_STATUS


def _normalise_hashes(sha256: str | None, sha256_prefix: str | None) -> tuple[str | None, str | None]:
    full = sha256.strip().lower() if sha256 else None
    prefix = sha256_prefix.strip().lower() if sha256_prefix else None
    if full is None and prefix is None:
        raise DownloadError(
            'refusing an unverifiable file: give sha256= (full digest) or sha256_prefix= '
            '(e.g. the 8 hex digits at the end of an OpenMMLab checkpoint name)'
        )
    if full is not None and (len(full) != 64 or not _HEX.match(full)):
        raise DownloadError(f'sha256 must be 64 hex digits, got {sha256!r}')
    if prefix is not None and (not 8 <= len(prefix) <= 64 or not _HEX.match(prefix)):
        raise DownloadError(f'sha256_prefix must be 8 to 64 hex digits, got {sha256_prefix!r}')
    if full is not None and prefix is not None and not full.startswith(prefix):
        raise DownloadError(f'inconsistent hashes: sha256 {full} does not start with sha256_prefix {prefix}')
    return full, prefix


def _matches(actual: str, full: str | None, prefix: str | None) -> bool:
    if full is not None:
        return actual == full
    assert prefix is not None
    return actual.startswith(prefix)


def _expected_str(full: str | None, prefix: str | None) -> str:
    return f'sha256 {full}' if full is not None else f'sha256 prefix {prefix}'


# -------------------------------------------------------------------------- download


def download_verified(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    sha256_prefix: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` and verify it; return ``Path(dest)``.

    At least one of ``sha256`` (full hex digest, preferred) and ``sha256_prefix`` is
    required; when both are given the full digest decides (and must start with the
    prefix). ``timeout`` is the per-socket-operation timeout in seconds; ``retries``
    is how many times a network failure is retried after the first attempt. See the
    module docstring for the resume / retry / cleanup rules.

    Raises :class:`DownloadError` on a hash mismatch (naming URL, expected and actual
    digest), on an HTTP error status (naming the status and URL) and when the
    retries are exhausted.
    """
    full, prefix = _normalise_hashes(sha256, sha256_prefix)
    dest = Path(dest)
    if dest.is_file():
        actual = sha256_file(dest)
        if _matches(actual, full, prefix):
            return dest
        log.warning(
            '%s exists but has sha256 %s, expected %s; downloading it again',
            dest,
            actual,
            _expected_str(full, prefix),
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')

    fresh_retry_left = True  # one from-zero retry after a mismatch on a resumed body
    while True:
        resumed = _fetch_with_retries(url, part, timeout=timeout, retries=retries, progress=progress, label=dest.name)
        actual = sha256_file(part)
        if _matches(actual, full, prefix):
            os.replace(part, dest)
            return dest
        _unlink(part)
        if resumed and fresh_retry_left:
            log.warning('%s: resumed download does not verify (stale .part?); refetching from zero', url)
            fresh_retry_left = False
            continue
        raise DownloadError(f'hash mismatch for {url}: expected {_expected_str(full, prefix)}, got sha256 {actual}')


def _fetch_with_retries(url: str, part: Path, *, timeout: float, retries: int, progress: bool, label: str) -> bool:
    """Bring ``part`` to the complete body of ``url``; return whether any resume happened."""
    attempt = 0
    resumed = False
    while True:
        try:
            resumed |= _fetch_once(url, part, timeout=timeout, progress=progress, label=label)
            return resumed
        except _HTTPStatus as e:
            if not e.transient or attempt >= retries:
                _unlink(part)
                raise DownloadError(f'{e} for {url}') from None
            err: BaseException = e
        except (_Truncated, urllib.error.URLError, *_NETWORK_ERRORS) as e:
            # (urlopen's HTTPError, a URLError subclass, never gets here: _fetch_once
            # turns it into _HTTPStatus.)
            if attempt >= retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f'download of {url} failed after {attempt + 1} attempt(s): {_describe(e)}'
                    + (f' ({have} bytes kept in {part} for resuming)' if have else '')
                ) from e
            err = e
        attempt += 1
        delay = min(_BACKOFF_BASE_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
        log.warning('%s: %s; retry %d/%d in %.1fs', url, _describe(err), attempt, retries, delay)
        if delay > 0:
            time.sleep(delay)


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return f'{type(e).__name__}: {e.reason}'
    return f'{type(e).__name__}: {e}'


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool, label: str) -> bool:
    """One HTTP exchange; leaves ``part`` complete or raises. Returns True if it resumed."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {'User-Agent': _USER_AGENT, 'Accept-Encoding': 'identity'}
    if offset:
        headers['Range'] = f'bytes={offset}-'
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:
                m = _CONTENT_RANGE_UNSAT.match(e.headers.get('Content-Range', '') or '')
                if m and int(m.group(1)) == offset:
                    return True  # the part already holds the whole body: go verify it
                log.warning('%s: server refused Range from byte %d (416); restarting from zero', url, offset)
                _unlink(part)
                return _fetch_once(url, part, timeout=timeout, progress=progress, label=label)
            raise _HTTPStatus(e.code, str(e.reason or '')) from None

    with resp:
        status = resp.status
        length = resp.headers.get('Content-Length')
        length = int(length) if length and length.isdigit() else None
        if status == 206 and offset:
            m = _CONTENT_RANGE.match(resp.headers.get('Content-Range', '') or '')
            if not m or int(m.group(1)) != offset:
                # A range we did not ask for: do not splice it in; start over cleanly.
                log.warning(
                    '%s: unexpected Content-Range %r for offset %d; restarting from zero',
                    url,
                    resp.headers.get('Content-Range'),
                    offset,
                )
                resp.close()
                _unlink(part)
                return _fetch_once(url, part, timeout=timeout, progress=progress, label=label)
            total = int(m.group(3)) if m.group(3) != '*' else (offset + length if length is not None else None)
            mode, start, resumed = 'ab', offset, True
        elif status == 200:
            if offset:
                log.info('%s: server ignored Range; downloading from zero', url)
            total = length
            mode, start, resumed = 'wb', 0, False
        else:
            raise _HTTPStatus(status, getattr(resp, 'reason', '') or '')

        written = start
        bar = _progress_bar(total, start, label, enabled=progress)
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(_CHUNK)
                    if not block:
                        break
                    f.write(block)
                    written += len(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()

    if total is not None:
        if written < total:
            raise _Truncated(f'response ended at byte {written} of {total}')
        if written > total:
            _unlink(part)
            raise DownloadError(f'{url}: received {written} bytes, more than the announced {total}')
    return resumed


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, initial: int, label: str, *, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # progress is cosmetic; never fail a download over it
        return _NoBar()
    return tqdm(
        total=total,
        initial=initial,
        unit='B',
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.5,
    )


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- zoo


def fetch_zoo_teacher(name_or_config: str, cache_dir: str | os.PathLike, sha256: str | None = None) -> Path:
    """Resolve an mmdet model-zoo entry and download its checkpoint into ``cache_dir``.

    ``name_or_config`` is a model-index ``Name``, a config stem or a config path (see
    :func:`dfmsd.engine.zoo.find_model`). The file lands in ``cache_dir/<basename of URL>``
    and is verified against ``sha256`` when given (e.g. pinned in params.yaml; it must
    then also agree with the index's prefix), else against the index's 8-hex prefix.
    """
    from dfmsd.engine.zoo import find_model

    model = find_model(name_or_config)
    # e.g. ".../reppoints_moment_r50_fpn_gn-neck%2Bhead_2x_coco_20200329-91babaa2.pth" is
    # stored as "..._gn-neck+head_2x_coco_20200329-91babaa2.pth"
    basename = Path(urllib.parse.unquote(urllib.parse.urlparse(model.url).path)).name
    if not basename:
        raise DownloadError(f'cannot derive a file name from {model.url!r}')
    return download_verified(
        model.url,
        Path(cache_dir) / basename,
        sha256=sha256,
        sha256_prefix=model.sha256_prefix or None,
    )
