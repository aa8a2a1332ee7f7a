"""DVC stages `evaluate_*@...`: a trained model's COCO predictions on val and test, and their
box metrics, with the run's identity and cost (its run.json) in one metrics file."""

import argparse

from dfmsd.core import cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--model', required=True, help='model directory (model.pth, model.py, run.json)')
    parser.add_argument('--predictions', required=True, help='directory for <split>.bbox.json')
    parser.add_argument('--metrics', required=True, help='metrics JSON file')
    args = parser.parse_args()

    from dfmsd.core.params import StageParams
    from dfmsd.evaluation import evaluate_model

    p = StageParams()
    evaluate_model(
        args.model,
        data=p.data,
        evaluate=p.evaluate,
        runtime=p.runtime,
        launch=p.launch,
        predictions=args.predictions,
        metrics=args.metrics,
    )


if __name__ == '__main__':
    cli.run(main)
