"""DVC stage `data`: make the synthetic dataset (data.generate: true), or check a dataset that is
already in place (your own, COCO), fully, before any training stage reads it."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--root', required=True, help='dataset root (params data.root)')
    parser.add_argument(
        '--manifest', required=True, help="the splits' content digests, which the other stages depend on"
    )
    args = parser.parse_args()

    from dfmsd.core.io import write_json
    from dfmsd.core.params import StageParams
    from dfmsd.data.coco import split_files, split_manifest, validate_split

    data = StageParams().data
    if data.generate:
        from dfmsd.data.synthetic import generate_from_params

        generate_from_params(data, args.root)
    manifest = {}
    for split in data.splits:
        ann, img = split_files(data, split)
        coco = validate_split(split, ann, img)
        print(f'[data] {split}: {ann} valid ({len(coco["images"])} images, {len(coco["annotations"])} boxes)')
        manifest[split] = split_manifest(ann, img, coco)
    write_json(args.manifest, manifest)


if __name__ == '__main__':
    cli.run(main)
