"""DVC stage `data`: generate the synthetic COCO-format dataset, or (`data.generate: false`,
the COCO preset) check that an existing dataset has the layout params.yaml names."""
from dfmsd import cli


def check_layout(data: dict) -> None:
    from dfmsd.engine.configs import split_files
    from dfmsd.data import DatasetError
    found = []
    for split in ('train', 'val'):
        ann, img = split_files(data, split)
        for key, path, exists in ((f'{split}_ann', ann, ann.is_file()), (f'{split}_img', img, img.is_dir())):
            if not exists:
                raise DatasetError(f"{path} not found (params.yaml data.{key}; data.generate is false, so the "
                                   f"dataset must already be in place: see docs/coco.md for the COCO 2017 layout)")
            found.append(str(path))
    print(f"[data] {', '.join(found)} present")


def main() -> None:
    from dfmsd.core.params import get, load_params
    params = load_params()
    data = get(params, 'data')
    if not data.get('generate', True):
        check_layout(data)
        return
    from dfmsd.data import generate_dataset
    summary = generate_dataset(
        data['root'], num_train=int(data['num_train']), num_val=int(data['num_val']),
        image_size=int(data['image_size']), seed=int(params.get('seed', 0)),
        small_image_fraction=float(data['small_image_fraction']),
        max_objects=int(data['max_objects']))
    print(f'[data] {summary}')


if __name__ == '__main__':
    cli.run(main)
