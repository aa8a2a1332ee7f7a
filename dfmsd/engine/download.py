"""Verified, resumable downloads of model checkpoints.

Why not ``torch.hub.download_url_to_file`` or ``pooch.retrieve``: neither resumes a partial
file (both start from zero every time), torch.hub has no retries or timeout, and pooch takes
only full digests (the zoo index gives 8-hex prefixes) and retries a 404 too. So the resume
and retry protocol below is ours, on urllib (requests' iter_content drops the bytes it buffered
when a body is cut short); the bar is tqdm, the digest ``sha256_file``.

Every file fetched here is checked against a SHA-256 digest -- the full digest when one is
known, otherwise the hex prefix embedded in OpenMMLab / torch.hub file names
(``<name>_<date>-<first 8 hex digits of sha256>.pth``). Files that cannot be checked are
refused.

Download protocol (:func:`download_verified`)
---------------------------------------------
* ``dest`` already present and verifying -> returned as is, no network access at all.
* Otherwise the body is streamed into ``<dest>.part`` beside it. A leftover ``.part`` is
  resumed with ``Range: bytes=<size>-``: a ``206`` is appended, a ``200`` (server ignored
  ``Range``) rewrites the part from byte zero, a ``416`` means there is nothing more to fetch.
* Connection-level failures (refused / reset / timed out, a body shorter than its
  ``Content-Length``) and the statuses 429, 500, 502, 503, 504 are retried up to ``retries``
  more times, each retry resuming from whatever is on disk.
* The complete body is hashed; on a match it is moved onto ``dest`` with :func:`os.replace`
  (``dest`` is never a partial file). A resumed body that does not match (a stale or
  oversized ``.part``, a server that sent the wrong range) is dropped and fetched once more
  from zero before giving up.

Only a network interruption (what resuming is for) keeps the ``.part`` for the next call; a
hash mismatch or an HTTP error status (any 4xx, or a 5xx still failing after the retries)
deletes it.

Checkpoints are pickles: only files whose SHA-256 has been verified are ever unpickled with
full pickle, in :func:`dfmsd.engine.checkpoint.load_verified`.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

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
_HEX = re.compile(r'^[0-9a-f]+$')
# "The network let us down": retried, and the .part is kept. (URLError: refused / DNS;
# TimeoutError is socket.timeout; HTTPException covers IncompleteRead and RemoteDisconnected.)
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError)


class _Truncated(ConnectionError):
    """The response ended before its ``Content-Length`` (urllib does not check)."""


class _HTTPStatus(Exception):
    """Non-success HTTP status; ``transient`` tells whether a retry may help."""

    def __init__(self, code: int, reason: str):
        super().__init__(f'HTTP {code} {reason}'.strip())
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
    return actual == full if full is not None else actual.startswith(prefix)


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
        log.warning('%s has sha256 %s, expected %s; downloading it again', dest, actual, _expected_str(full, prefix))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + '.part')

    fresh_retry_left = True  # one from-zero retry after a mismatch on a resumed body
    while True:
        resumed = _fetch_with_retries(url, part, timeout=timeout, retries=retries, progress=progress, label=dest.name)
        actual = sha256_file(part)
        if _matches(actual, full, prefix):
            os.replace(part, dest)
            return dest
        part.unlink()
        if resumed and fresh_retry_left:
            log.warning('%s: resumed download does not verify (stale .part?); refetching from zero', url)
            fresh_retry_left = False
            continue
        raise DownloadError(f'hash mismatch for {url}: expected {_expected_str(full, prefix)}, got sha256 {actual}')


def _fetch_with_retries(url: str, part: Path, *, timeout: float, retries: int, progress: bool, label: str) -> bool:
    """Bring ``part`` to the complete body of ``url``; return whether it kept earlier bytes."""
    attempt = 0
    while True:
        try:
            return _fetch_once(url, part, timeout=timeout, progress=progress, label=label)
        except _HTTPStatus as e:
            if not e.transient or attempt == retries:
                part.unlink(missing_ok=True)
                raise DownloadError(f'{e} for {url}') from None
            err: Exception = e
        except _NETWORK_ERRORS as e:
            if attempt == retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f'download of {url} failed after {attempt + 1} attempt(s): {_describe(e)}'
                    + (f' ({have} bytes kept in {part} for resuming)' if have else '')
                ) from e
            err = e
        attempt += 1
        delay = min(_BACKOFF_BASE_S * 2 ** (attempt - 1), _BACKOFF_MAX_S)
        log.warning('%s: %s; retry %d/%d in %.1fs', url, _describe(err), attempt, retries, delay)
        time.sleep(delay)


def _describe(e: BaseException) -> str:
    return f'{type(e).__name__}: {e}'


def _fetch_once(url: str, part: Path, *, timeout: float, progress: bool, label: str) -> bool:
    """One HTTP exchange; leaves ``part`` complete or raises. Returns True if it kept earlier bytes."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: offsets count the file's own bytes; a UA of our own, as some hosts refuse Python-urllib's
    headers = {'User-Agent': 'dfmsd-download/0.1 (+urllib)', 'Accept-Encoding': 'identity'}
    if offset:
        headers['Range'] = f'bytes={offset}-'
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            return True  # nothing past the part: verification decides whether it is whole
        raise _HTTPStatus(e.code, str(e.reason or '')) from None
    with resp:
        if resp.status == 206 and offset:
            start = offset
        elif resp.status == 200:
            if offset:
                log.info('%s: server ignored Range; downloading from zero', url)
            start = 0
        else:
            raise _HTTPStatus(resp.status, resp.reason or '')
        length = resp.headers.get('Content-Length')
        total = start + int(length) if length and length.isdigit() else None
        written = start
        with (
            open(part, 'ab' if start else 'wb') as f,
            tqdm(total=total, initial=start, unit='B', unit_scale=True, unit_divisor=1024, desc=label,
                 disable=not progress, leave=False) as bar,
        ):  # fmt: skip
            for block in iter(lambda: resp.read(_CHUNK), b''):
                f.write(block)
                written += len(block)
                bar.update(len(block))
            f.flush()
            os.fsync(f.fileno())
    if total is not None and written < total:
        raise _Truncated(f'response ended at byte {written} of {total}')
    return start > 0


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
