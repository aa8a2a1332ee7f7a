"""DVC stage `report`: reports/results.md, results.csv and reports/figures/*.png."""
from dfmsd import cli


def main() -> None:
    from dfmsd.core.params import load_params
    from dfmsd.report import build_rows, plot_figures, write_tables
    params = load_params()
    rows = build_rows(params)
    write_tables(rows, 'reports', notes=[])
    for path in plot_figures(rows, params, 'reports/figures'):
        print(f'[report] wrote {path}')
    print(open('reports/results.md').read())


if __name__ == '__main__':
    cli.run(main)
