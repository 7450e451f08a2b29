"""Evaluation: metrics and the threshold, intervals and the paired test, calibration, heatmaps, the test split.

Entry points: :mod:`.metrics` (``compute_metrics``, ``tune_threshold``, ``selection_score``),
:mod:`.stats` (``metric_intervals``, ``paired_score_difference``), :func:`.calibration.fit_calibrator`,
:func:`.explain.explain_examples`, :class:`.holdout.TestSet` and :func:`.holdout.read_test_set`.
"""
