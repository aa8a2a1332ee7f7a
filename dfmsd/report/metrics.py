"""The COCO box metrics the pipeline records, in pycocotools' COCOeval.stats order (percent)."""

METRIC_NAMES = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR@1', 'AR@10', 'AR@100', 'ARs', 'ARm', 'ARl')
#: What each metrics file keeps, and the paper's table columns.
REPORTED_METRICS = ('mAP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR@100', 'ARs', 'ARm', 'ARl')
PAPER_COLUMNS = ('mAP', 'APs', 'APm', 'APl', 'AR@100', 'ARs', 'ARm', 'ARl')
