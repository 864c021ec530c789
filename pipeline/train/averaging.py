"""--average-last K: the equal-weight average of the weights at the end of each of the last K epochs (SWA).

The average is a running mean (torch's AveragedModel, equal weights) of the
parameters after each epoch of the window ``[epochs - K, epochs)``. Averaging
weights does not average BatchNorm statistics: the mean of K networks' running
statistics does not describe the averaged network's activations, so after each
update they are recomputed on the training images (Izmailov et al. 2018, torch's
``swa_utils.update_bn``) through the member's own training loader. With
``--select last`` (the only selection averaging allows) the member keeps the
average: validation, out-of-fold predictions and predict all score it.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.models import set_train_mode
from pipeline.models.fusion import batch_meta, call

log = logging.getLogger("pipeline")


class EpochAverage:
    """The running equal-weight average of consecutive epochs' weights inside the window, and which epochs."""

    def __init__(self, model: nn.Module, k: int):
        from torch.optim.swa_utils import AveragedModel

        self.k = k
        self.avg = AveragedModel(model, use_buffers=False)  # buffers: recomputed by recompute_bn
        self.epochs: list[int] = []  # 0-based epochs in the average

    @property
    def module(self) -> nn.Module:
        return self.avg.module

    def update(self, model: nn.Module, epoch: int, total_epochs: int) -> bool:
        """Add the weights ending ``epoch`` (0-based) when it is in the window; True when it was added.

        An average holding epochs outside the window, or not ending at the
        previous epoch (--epochs changed on --resume), starts again here: it then
        holds fewer than K epochs, and says so.
        """
        start = total_epochs - self.k
        if epoch < start:
            return False
        if self.epochs and (self.epochs[0] < start or self.epochs[-1] != epoch - 1):
            log.warning("--average-last %d: the average of epochs %s is outside the window %d-%d (--epochs moved); "
                        "it starts again at epoch %d", self.k, _span(self.epochs), start + 1, total_epochs, epoch + 1)
            self.avg.n_averaged.zero_()
            self.epochs = []
        self.avg.update_parameters(model)
        self.epochs.append(epoch)
        return True

    def state_dict(self) -> dict:
        return {"model": self.avg.state_dict(), "epochs": list(self.epochs)}

    def load_state_dict(self, state: dict) -> None:
        self.avg.load_state_dict(state["model"])
        self.epochs = [int(e) for e in state["epochs"]]


def make_average(model: nn.Module, k: int) -> EpochAverage | None:
    """The member's epoch average, or None without --average-last."""
    return EpochAverage(model, k) if k else None


def training_norms(model: nn.Module) -> set[str]:
    """Names of the BatchNorm layers training updates (a frozen backbone's stay in eval): those to recompute."""
    set_train_mode(model, True)
    return {name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training}


@torch.no_grad()
def recompute_bn(model: nn.Module, net: nn.Module, loader, device: torch.device, names: set[str], *,
                 max_batches: int | None = None, autocast=None, channels_last: bool = False) -> int:
    """BatchNorm running statistics of ``model`` (seen through ``net``) recomputed on ``loader``'s batches.

    As torch's ``swa_utils.update_bn``: statistics reset, momentum None (an equal
    mean over the batches), one forward pass in train mode; only the layers in
    ``names`` (the others in eval); a layer the pass never reached keeps its
    former statistics.
    Returns the number of images seen.
    """
    norms = {n: m for n, m in model.named_modules() if n in names and isinstance(m, _BatchNorm)}
    if not norms:
        return 0
    saved = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in norms.items()}
    momenta = {n: m.momentum for n, m in norms.items()}
    was_training = model.training
    model.train()  # as training saw them (dropout included), as torch's update_bn does
    for n, m in model.named_modules():
        if isinstance(m, _BatchNorm) and n not in norms:
            m.eval()  # a frozen backbone's statistics stay as they are
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None
    seen = 0
    for i, (x, _, idx) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        meta = batch_meta(loader, idx, device)
        x = x.to(device)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            call(net, x, meta)
        seen += x.shape[0]
    for n, m in norms.items():
        m.momentum = momenta[n]
        if int(m.num_batches_tracked) == 0:  # never called (e.g. an unused auxiliary head)
            m.load_state_dict(saved[n])
    model.train(was_training)
    return seen


def update_average(st, model: nn.Module, epoch: int, total_epochs: int) -> bool:
    """After epoch ``epoch``: add its weights to ``st.average`` when in the window, then recompute the
    average's BatchNorm statistics on the member's training loader; True when the average changed."""
    if st.average is None or not st.average.update(model, epoch, total_epochs):
        return False
    rt = st.rt
    seen = recompute_bn(st.average.module, st.data.view(st.average.module), st.data.train, rt.device,
                        training_norms(model), max_batches=rt.steps_per_epoch * st.plan.config.accum_steps,
                        autocast=rt.autocast, channels_last=rt.channels_last)
    bn = (f"its BatchNorm statistics recomputed on {seen} training images" if seen else
          "no BatchNorm statistics to recompute")
    log.info("--average-last %d: the kept weights are the average of epochs %s, %s", st.average.k,
             _span(st.average.epochs), bn)
    return True


def _span(epochs: list[int]) -> str:
    """1-based epochs as "a-b" (consecutive) or "a"."""
    first, last = epochs[0] + 1, epochs[-1] + 1
    return f"{first}-{last}" if last > first else str(first)


def warn_unaveraged(st, cfg) -> None:
    """A member that stopped (--early-stop, --time-limit) before its averaging window keeps its last weights."""
    if st.average is not None and not st.average.epochs:
        log.warning("--average-last %d: %s stopped after epoch %d, before the averaged epochs %d-%d; it keeps the "
                    "last epoch's weights", cfg.average_last, st.plan.member.name, len(st.history),
                    cfg.epochs - cfg.average_last + 1, cfg.epochs)
