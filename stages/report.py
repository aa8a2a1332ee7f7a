"""DVC stage `report`: the result tables, verdicts and figures, from measured files only.

    python stages/report.py --metrics metrics --logs logs --me data/me --out reports

Writes <out>/results.md, results.csv, runs.csv, summary.json (the DVC metric), plots/map.csv and
plots/loss.csv (DVC plot data) and figures/*.png; see dfmsd.report.write.write_report. Reads
only the params its dvc.yaml entry declares (report, seeds, pairs, students, the method groups,
me.threshold); imports neither torch nor mmdet.
"""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--metrics', required=True, help='directory of metrics JSON files (searched recursively)')
    parser.add_argument('--logs', required=True, help='directory of training-loss CSV logs')
    parser.add_argument('--me', required=True, help='ME directory: <pair>/boxes/area_ratios.json, <pair>/seed<k>.json')
    parser.add_argument('--out', required=True, help='report directory')
    args = parser.parse_args()

    import sys
    import warnings

    from dfmsd.core.params import stage_params
    from dfmsd.report.loading import ReportWarning
    from dfmsd.report.write import write_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', ReportWarning)
        written = write_report(
            stage_params(), metrics_dir=args.metrics, logs_dir=args.logs, me_dir=args.me, out_dir=args.out
        )
    for w in caught:  # files left out (also listed under "Notes" in results.md)
        print(f'warning [report]: {w.message}', file=sys.stderr)
    for path in written:
        print(f'[report] wrote {path}')


if __name__ == '__main__':
    cli.run(main)
