"""Look-ups in the model zoo index that ships inside the installed mmdet package.

mmdet's wheel carries ``mmdet/.mim/model-index.yml``, which ``Import``s one
``configs/<algo>/metafile.yml`` per algorithm; each metafile lists ``Models`` with a
``Name``, a ``Config`` (relative to ``.mim``), ``Results`` and ``Weights`` (a URL whose
file name ends in ``-<first 8 hex digits of the file's sha256>.pth``, the torch.hub /
mmcv convention). Nothing here imports mmdet itself (only its location is looked up),
so these look-ups are fast and do not pull in torch / mmcv.

Only entries with downloadable ``Weights`` are indexed. The parsed index is cached
per process.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import yaml

from dfmsd.core.errors import ParamsError

__all__ = ['ZooModel', 'find_model', 'find_teacher_model', 'list_models', 'mim_dir']

_HASH_SUFFIX = re.compile(r'-([0-9a-f]{8,64})\.pth$')
# yaml.safe_load semantics (SafeLoader), with libyaml's C implementation when present:
# about 10x faster on the ~100 metafiles.
_SAFE_LOADER = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


def _safe_load(f):
    return yaml.load(f, Loader=_SAFE_LOADER)  # noqa: S506 - a SafeLoader, never the full one


@dataclass(frozen=True)
class ZooModel:
    name: str
    #: absolute path of the config inside the installed mmdet ``.mim`` directory
    config: str
    url: str
    #: hex sha256 prefix taken from the URL's file name ("" if the URL carries none)
    sha256_prefix: str
    #: COCO box AP reported in the metafile, if any
    box_ap: float | None


def mim_dir() -> Path:
    """The directory holding mmdet's ``model-index.yml`` and ``configs/``.

    That is ``<site-packages>/mmdet/.mim`` for a wheel install, or the repository root
    for an editable install from a source checkout.
    """
    spec = importlib.util.find_spec('mmdet')
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError('mmdet is not installed; the model zoo index ships with it')
    for loc in spec.submodule_search_locations:
        pkg = Path(loc)
        for cand in (pkg / '.mim', pkg.parent):
            if (cand / 'model-index.yml').is_file():
                return cand.resolve()
    raise FileNotFoundError(
        f'no model-index.yml under {list(spec.submodule_search_locations)} (looked in .mim/ and the parent)'
    )


@dataclass(frozen=True)
class _Index:
    models: tuple[ZooModel, ...]
    by_name: dict[str, ZooModel]
    by_config_stem: dict[str, tuple[ZooModel, ...]]


def _box_ap(results) -> float | None:
    if not isinstance(results, list):
        return None
    found = []
    for r in results:
        if not isinstance(r, dict) or not isinstance(r.get('Metrics'), dict):
            continue
        ap = r['Metrics'].get('box AP')
        if ap is None:
            continue
        try:
            ap = float(ap)
        except (TypeError, ValueError):
            continue
        found.append((str(r.get('Dataset', '')).upper() != 'COCO', ap))  # COCO first
    return min(found, key=lambda t: t[0])[1] if found else None


def _weights_url(w) -> str | None:
    if isinstance(w, list):  # never seen in practice; be lenient
        w = next((x for x in w if isinstance(x, str)), None)
    if isinstance(w, str) and w.strip().startswith(('http://', 'https://')):
        return w.strip()
    return None


def _config_path(root: Path, metafile_dir: Path, rel: str) -> Path:
    """Absolute config path, repairing two metafile quirks seen in mmdet 3.3.0.

    Some entries URL-encode the directory (``configs/gn%2Bws/...`` for ``gn+ws``)
    and some give a bare file name (``albu_example``). If no candidate exists the
    literal path is returned (a handful of index entries point at configs that are
    not shipped).
    """
    literal = root / rel
    for cand in (literal, root / urllib.parse.unquote(rel), metafile_dir / Path(rel).name):
        if cand.is_file():
            return cand.resolve()
    return literal.resolve()


@functools.lru_cache(maxsize=4)
def _load_index(root: str) -> _Index:
    root_p = Path(root)
    with open(root_p / 'model-index.yml', encoding='utf-8') as f:
        top = _safe_load(f) or {}
    metafiles = top.get('Import') or []
    models: list[ZooModel] = []
    seen: set[str] = set()
    for rel in metafiles:
        path = root_p / rel
        if not path.is_file():
            continue
        with open(path, encoding='utf-8') as f:
            meta = _safe_load(f)
        if not isinstance(meta, dict):
            continue
        for m in meta.get('Models') or []:
            if not isinstance(m, dict) or not m.get('Name') or not m.get('Config'):
                continue
            url = _weights_url(m.get('Weights'))
            if url is None or m['Name'] in seen:
                continue
            seen.add(m['Name'])
            h = _HASH_SUFFIX.search(url)
            models.append(
                ZooModel(
                    name=str(m['Name']),
                    config=str(_config_path(root_p, path.parent, str(m['Config']))),
                    url=url,
                    sha256_prefix=h.group(1) if h else '',
                    box_ap=_box_ap(m.get('Results')),
                )
            )
    by_stem: dict[str, list[ZooModel]] = {}
    for zm in models:
        by_stem.setdefault(Path(zm.config).stem, []).append(zm)
    return _Index(
        models=tuple(models),
        by_name={zm.name: zm for zm in models},
        by_config_stem={k: tuple(v) for k, v in by_stem.items()},
    )


def _index() -> _Index:
    return _load_index(str(mim_dir()))


def list_models() -> list[ZooModel]:
    """All indexed models with weights, in model-index order."""
    return list(_index().models)


def _norm(s: str) -> str:
    return s.lower().replace('-', '_')


def find_model(name: str) -> ZooModel:
    """Resolve a model-index ``Name``, a config stem or a config path to a :class:`ZooModel`.

    Order: exact ``Name``; then the config stem (``configs/x/foo.py`` and ``foo`` are
    the same query) -- the entry whose ``Name`` equals the stem wins, otherwise it must
    be the only entry with that config; then the same two look-ups ignoring case and
    ``-`` vs ``_`` (so mmdet 2.x spellings such as ``faster_rcnn_r50_fpn_1x_coco``
    resolve) when that is unambiguous. Raises ``KeyError`` listing close matches.
    """
    idx = _index()
    q = str(name).strip()
    if q in idx.by_name:
        return idx.by_name[q]
    stem = Path(q).stem if (q.endswith('.py') or '/' in q) else q
    if stem in idx.by_name:
        return idx.by_name[stem]
    cands = idx.by_config_stem.get(stem, ())
    if len(cands) == 1:
        return cands[0]
    if len(cands) > 1:
        raise KeyError(
            f'config {stem!r} is used by several mmdet zoo models: {", ".join(c.name for c in cands)}; '
            'ask for one by name'
        )
    n = _norm(stem)
    loose = {zm.name: zm for zm in idx.models if _norm(zm.name) == n}
    if not loose:
        loose = {zm.name: zm for zm in idx.models if _norm(Path(zm.config).stem) == n}
    if len(loose) == 1:
        return next(iter(loose.values()))

    close = _suggest(n, sorted(set(idx.by_name) | set(idx.by_config_stem)))
    hint = f'; close matches: {", ".join(close)}' if close else ''
    amb = f' (ambiguous: {", ".join(sorted(loose))})' if len(loose) > 1 else ''
    raise KeyError(f'unknown mmdet model zoo entry {q!r}{amb} among {len(idx.models)} models{hint}')


def find_teacher_model(name: str, key: str) -> ZooModel:
    """:func:`find_model` for the params entry ``key`` (``pairs.<pair>.<role>.zoo``): a name it
    cannot resolve is the user's to fix, so a ParamsError naming the key, not a KeyError."""
    try:
        return find_model(name)
    except KeyError as err:
        raise ParamsError(f'{key}: {err.args[0]}') from None


def _suggest(n: str, keys: list[str], k: int = 8) -> list[str]:
    """Up to ``k`` keys resembling the normalised query ``n`` (difflib ratio, boosted for
    keys of the same algorithm family and for keys containing the query)."""
    if not n:
        return []
    family = n.split('_')[0] + '_'
    scored = []
    for key in keys:
        nk = _norm(key)
        score = difflib.SequenceMatcher(None, n, nk).ratio()
        if nk.startswith(family):
            score += 0.25
        if n in nk:
            score += 0.5
        if score >= 0.6:
            scored.append((-score, key))
    return [key for _, key in sorted(scored)[:k]]
