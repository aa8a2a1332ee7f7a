"""DVC stage `me_table@<pair>-<seed>`: the masking-enhancement decision of every training image
for one run seed (noise, crop or none), from the teacher's r(I); the views themselves are made
in the training data pipeline (dfmsd.data.me)."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--ratios', required=True, help="teacher_boxes' area_ratios.json")
    parser.add_argument('--seed', type=int, required=True)
    parser.add_argument('--out', required=True, help='decision table JSON')
    args = parser.parse_args()

    from dfmsd.core.io import read_json, write_json
    from dfmsd.core.params import StageParams
    from dfmsd.data.me import decision_table

    me = StageParams().me
    ratios = {int(k): float(v) for k, v in read_json(args.ratios)['area_ratios'].items()}
    table = decision_table(ratios, me, seed=args.seed)
    write_json(args.out, table, indent=None)
    print(f'[me_table] seed {args.seed}: {table["counts"]}')


if __name__ == '__main__':
    cli.run(main)
