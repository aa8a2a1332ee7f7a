"""DVC stage `augment`: masking-enhanced (ME) copies of the training set, made once."""
from dfmsd import cli


def main() -> None:
    import json
    from pathlib import Path

    from dfmsd.augment import augment_dataset
    from dfmsd.configs import split_files
    from dfmsd.params import get, load_params
    params = load_params()
    cfg = get(params, 'augment')
    train_ann, train_img = split_files(get(params, 'data'), 'train')
    ratios = json.loads(Path('data/teacher_boxes/area_ratios.json').read_text())['area_ratios']
    summary = augment_dataset(
        train_ann, train_img,
        {int(k): v for k, v in ratios.items()}, 'data/augmented',
        threshold=float(cfg['threshold']), noise_prob=float(cfg['noise_prob']),
        noise_sigma=float(cfg['noise_sigma']), crop_min=float(cfg['crop_min']),
        crop_max=float(cfg['crop_max']), min_box_area=float(cfg['min_box_area']),
        min_visible=float(cfg['min_visible']), seed=int(params.get('seed', 0)))
    print(f'[augment] {summary}')


if __name__ == '__main__':
    cli.run(main)
