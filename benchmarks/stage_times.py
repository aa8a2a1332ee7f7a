"""Where a pipeline run's time went: the flow's summary table (one line per stage, printed at
the end of ``make repro`` / ``python -m flows``) grouped by stage, as a Markdown table.

    python benchmarks/stage_times.py make-repro.log

A run stopped before its end (a signal) prints no summary: then each stage task's own line
(``... - STAGE: ran (12.3 s) ...``) counts.

Per group: stages that ran, their total, median and longest time, and the share of all stage
time (stage times overlap on a cluster of several workers: the sum exceeds the wall time).
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

#: a summary line: | `stage` | outcome | 12.3 s | worker | detail |
LINE = re.compile(r'^\| `(?P<stage>[^`]+)` \| (?P<outcome>[a-z ]+) \| (?P<seconds>[\d.]+) s \|')
#: a stage task's last line: ... | Task run 'stage' - stage: ran (12.3 s) worker detail
TASK_LINE = re.compile(r"Task run '(?P<stage>[^']+)' - (?P=stage): (?P<outcome>[a-z ]+) \((?P<seconds>[\d.]+) s\)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('log', type=Path, help="a flow run's output (its summary table, or a stopped run's task lines)")
    args = parser.parse_args()
    ran: dict[str, float] = {}  # by stage: the flow prints its summary more than once
    lines = args.log.read_text(encoding='utf-8', errors='replace').splitlines()
    for line in lines:
        if (m := LINE.match(line)) and m['outcome'] == 'ran':
            ran[m['stage']] = float(m['seconds'])
    if not ran:  # stopped before its summary
        for line in lines:
            if (m := TASK_LINE.search(line)) and m['outcome'] == 'ran':
                ran[m['stage']] = float(m['seconds'])
    times: dict[str, list[float]] = defaultdict(list)
    for stage, seconds in ran.items():
        times[stage.split('@', 1)[0]].append(seconds)
    if not times:
        raise SystemExit(f'{args.log}: no summary line of a stage that ran')
    total = sum(map(sum, times.values()))
    print('| stage group | ran | total | median | longest | share |')
    print('|---|---|---|---|---|---|')
    for group, secs in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(
            f'| `{group}` | {len(secs)} | {sum(secs):.0f} s | {statistics.median(secs):.1f} s | '
            f'{max(secs):.1f} s | {sum(secs) / total:.0%} |'
        )
    print(f'| all | {sum(map(len, times.values()))} | {total:.0f} s | | | 100% |')


if __name__ == '__main__':
    main()
