"""What a flow run leaves behind: its Prefect artifacts, and a DVC experiment.

* ``dvc-pipeline-summary`` (a table): each stage's outcome, seconds, worker and details, the
  cause of a failure first;
* the report, only when this run's ``report`` stage ran or was restored (a run that did not
  rebuild it must not show another run's tables as its own): ``reports/results.md`` as
  markdown and ``reports/summary.json`` as a table, keyed ``report-results`` and
  ``report-summary`` for the repository's params, ``...-<preset>`` for a preset's;
* :func:`save_experiment`: the workspace as a DVC experiment (``dvc exp save``).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from flows import stages
from flows.stages import PipelineError, StageResult

#: Keys of the flow run's artifacts (the report's get ``-<preset>`` for a preset).
SUMMARY_KEY = 'dvc-pipeline-summary'
REPORT_KEY = 'report-results'
REPORT_SUMMARY_KEY = 'report-summary'
#: The stage that writes the report, and what it writes.
REPORT_STAGE = 'report'
REPORT_MD = Path('reports/results.md')
REPORT_JSON = Path('reports/summary.json')


def slug(text: str) -> str:
    """An artifact key (or experiment name part): lowercase letters, digits and dashes only."""
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-') or 'x'


def report_keys(preset: str | None) -> tuple[str, str]:
    """The keys of the report's markdown and summary artifacts for ``preset`` (None: params.yaml)."""
    suffix = f'-{slug(preset)}' if preset else ''
    return REPORT_KEY + suffix, REPORT_SUMMARY_KEY + suffix


def summary_rows(results: list[StageResult]) -> list[dict[str, Any]]:
    return [
        {
            'stage': r.stage,
            'outcome': r.outcome,
            'seconds': round(r.seconds, 1),
            'worker': r.where,
            'details': ' '.join(r.message.split())[:300],  # the cause of a failure comes first
        }
        for r in results
    ]


def report_summary_rows(summary: Any) -> list[dict[str, Any]]:
    """``reports/summary.json`` as table rows: ``{row: mAP}``, or ``{group: {row: mAP}}`` for
    several student/pair groups (dfmsd.report.machine_readable.summary); a row may hold several metrics."""
    if not isinstance(summary, dict):
        return [{'row': 'summary', 'mAP': json.dumps(summary)}]
    groups = summary if all(isinstance(v, dict) for v in summary.values()) else {None: summary}
    rows = []
    for group, entries in groups.items():
        for row, value in entries.items():
            cells = value if isinstance(value, dict) else {'mAP': value}
            rows.append({**({'group': group} if group else {}), 'row': row, **cells})
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return [{c: r.get(c) for c in columns} for r in rows]


def publish_reports(root: Path, preset: str | None, results: list[StageResult], logger) -> list[str]:
    """The report (markdown) and its summary.json (table), if this run's report stage ran or
    was restored; the keys of the artifacts made."""
    if not any(r.stage == REPORT_STAGE and r.outcome in ('ran', 'restored') for r in results):
        return []
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    md_key, summary_key = report_keys(preset)
    what = f"preset '{preset}'" if preset else 'params.yaml'
    keys = []
    md = root / REPORT_MD
    if md.is_file():
        create_markdown_artifact(markdown=md.read_text(), key=md_key, description=f'`{REPORT_MD}` of {what}')
        keys.append(md_key)
    summary = root / REPORT_JSON
    if summary.is_file():
        try:
            rows = report_summary_rows(json.loads(summary.read_text()))
        except ValueError as exc:
            logger.warning('cannot read %s: %s', summary, exc)
        else:
            create_table_artifact(table=rows, key=summary_key, description=f'`{REPORT_JSON}` of {what}')
            keys.append(summary_key)
    return keys


def save_experiment(root: Path, name: str, targets: list[str] | None = None, message: str | None = None) -> str:
    """``dvc exp save``: the workspace of ``repo`` as DVC experiment ``name`` (replaced if it
    exists); ``targets`` limits what DVC commits (a run of some targets leaves the others'
    outputs absent). Untracked ``.gitignore`` files DVC wrote and ``reports/`` go with it.
    Returns the experiment's name."""
    untracked = subprocess.run(
        ['git', 'ls-files', '-z', '--others', '--exclude-standard'],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split('\0')
    include = sorted(p for p in untracked if p and (Path(p).name == '.gitignore' or p.startswith('reports/')))
    args = ['exp', 'save', '--json', '--force', '--name', name]
    args += [a for p in include for a in ('--include-untracked', p)]
    if message:
        args += ['--message', message]
    code, lines = stages.dvc(root, *args, *(targets or []))
    if code != 0:
        raise PipelineError(f'`dvc exp save` exited with {code}:\n' + '\n'.join(lines[-stages.TAIL_LINES :]))
    text = '\n'.join(lines)
    start = text.find('{')
    saved = json.loads(text[start : text.rfind('}') + 1]) if start >= 0 else {}
    return saved.get('ref_info', {}).get('name') or saved.get('name') or name
