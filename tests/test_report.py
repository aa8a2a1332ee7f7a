"""Verdict lines: plain statements that follow the measured numbers."""
from dfmsd.report import verdicts


def row(name, method, mAP, baseline=False):
    return dict(name=name, method=method, mAP=mAP, is_baseline=baseline)


def test_verdicts_follow_the_numbers_and_set_an_ablation_against_the_full_method():
    rows = [row('teacher_strong', 'Teacher', 35.0), row('student', 'Baseline', 17.1, baseline=True),
            row('mgd', 'MGD', 25.2), row('pkd', 'PKD', 25.8),
            row('dfmsd_stage2', 'DFMSD', 25.1), row('dfmsd_no_sal', 'DFMSD w/o SAL', 25.1)]
    assert verdicts(rows) == [
        '- DFMSD beats Baseline: 25.1 vs 17.1 mAP (+8.0).',
        '- DFMSD does NOT beat MGD: 25.1 vs 25.2 mAP (-0.1).',
        '- DFMSD does NOT beat PKD: 25.1 vs 25.8 mAP (-0.7).',
        '- DFMSD w/o SAL beats Baseline: 25.1 vs 17.1 mAP (+8.0).',
        '- DFMSD w/o SAL does NOT beat MGD: 25.1 vs 25.2 mAP (-0.1).',
        '- DFMSD w/o SAL does NOT beat PKD: 25.1 vs 25.8 mAP (-0.7).',
        '- DFMSD w/o SAL ties DFMSD: 25.1 vs 25.1 mAP (+0.0).',
    ]
