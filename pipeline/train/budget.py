"""Time budgets of training (pure): whether a member stops at this epoch boundary for --time-limit.

A Kaggle kernel has a hard wall-clock limit; a member stopped mid-epoch has
no finished weights. So the check runs at epoch boundaries and looks one epoch
ahead: training stops when another epoch as long as the last one would pass
the limit, and the member is finished with the epochs it has (their schedule
cut short, as an early stop cuts it).
"""
from __future__ import annotations


def time_is_up(elapsed_s: float, last_epoch_s: float, limit_minutes: float) -> bool:
    """True when another epoch of ``last_epoch_s`` after ``elapsed_s`` would pass ``limit_minutes`` (0: never)."""
    return limit_minutes > 0 and elapsed_s + last_epoch_s > limit_minutes * 60.0
