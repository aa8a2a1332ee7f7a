"""DVC stage `data`: generate the synthetic COCO-format dataset."""
from dfmsd import cli


def main() -> None:
    from dfmsd.data import generate_dataset
    from dfmsd.params import get, load_params
    params = load_params()
    data = get(params, 'data')
    summary = generate_dataset(
        data['root'], num_train=int(data['num_train']), num_val=int(data['num_val']),
        image_size=int(data['image_size']), seed=int(params.get('seed', 0)),
        small_image_fraction=float(data['small_image_fraction']),
        max_objects=int(data['max_objects']))
    print(f'[data] {summary}')


if __name__ == '__main__':
    cli.run(main)
