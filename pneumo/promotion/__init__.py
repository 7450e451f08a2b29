"""Promotion: MLflow runs of a retraining, the gate's verdict, and the registry aliases it moves, under a lock.

Entry points: :mod:`.tracking` (``start_retraining``, ``log_candidate``, ``finish_retraining``),
:func:`.registry.promote`, :func:`.registry.rollback`, :func:`.registry.champion_info`,
:func:`.lock.promotion_lock`, :func:`.leaderboard.leaderboard` and :func:`.runs.latest_retraining`.
"""
