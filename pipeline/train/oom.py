"""Out of memory while training with --batch-size auto: half the batch, the epoch again from last.pt.

The member is set up again as ``--resume`` would set it up, from the last
saved epoch (or from scratch in the first), with the plan's batch halved
(:func:`pipeline.train.plan.halved`: the lr follows the batch); its config.json
records the batch it trains with from then on.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from pipeline.runs import Run
from pipeline.train.autobatch import free_memory
from pipeline.train.plan import MemberPlan, halved
from pipeline.train.setup import MemberState, setup_member

log = logging.getLogger("pipeline")


def restart_halved(plan: MemberPlan, metric: str, epoch: int,
                   error: BaseException) -> tuple[MemberPlan, MemberState]:
    """After running out of memory in ``epoch``: the plan with half the batch (--batch-size auto only) and
    the member set up again from its last saved epoch (as --resume), ``(plan, st)``; else ``error`` again."""
    if not plan.batch_auto or plan.config.batch_size <= 1:
        raise error
    error.__traceback__ = None  # its frames hold the failed step's tensors
    new = halved(plan, epoch)
    log.warning("%s", new.notes[-1])
    free_memory()
    st = setup_member(new, metric, resume=True)
    new.member.write_config(replace(new.config, head=new.config.model_head).to_json(), st.data.device.to_json(),
                            new.to_json())
    prefix = f"note: {new.member.name}: batch_size {plan.config.batch_size} -> "  # one line per halving in summary.txt
    Run(new.config.run_dir).note_in_summary(prefix + new.notes[-1].split(" -> ", 1)[1], prefix)
    return new, st
