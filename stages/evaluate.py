"""DVC stage `evaluate@<model>`: COCO predictions on val and their metrics.

Writes predictions/<model>.bbox.json (cached by DVC) and metrics/<model>.json
(mAP, AP50, AP75, APs, APm, APl, AR@100, ARs, ARm, ARl in percent; in git).
"""
import argparse

from dfmsd import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('model', help='name of a checkpoint in models/ (models/<model>.pth)')
    args = parser.parse_args()

    import dfmsd.models  # noqa: F401
    from mmengine.config import Config

    from dfmsd.configs import data_layout
    from dfmsd.evaluation import coco_metrics, predict_coco_json, write_json_atomic
    from dfmsd.params import get, load_params
    params = load_params()
    root = get(params, 'data.root')
    layout = data_layout(get(params, 'data'))
    ann = layout['val_ann']
    preds = predict_coco_json(Config.fromfile(f'models/{args.model}.py'), f'models/{args.model}.pth',
                              f'predictions/{args.model}.bbox.json', data_root=root, ann_file=ann,
                              img_prefix=layout['val_img'], score_thr=float(get(params, 'evaluate.score_thr')))
    metrics = coco_metrics(f'{root}/{ann}', preds)
    write_json_atomic(metrics, f'metrics/{args.model}.json')
    print(f'[evaluate] {args.model}: ' + ', '.join(f'{k} {v:.1f}' for k, v in metrics.items()))


if __name__ == '__main__':
    cli.run(main)
