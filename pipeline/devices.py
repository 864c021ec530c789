"""Every CPU-vs-GPU decision as a pure function of an :class:`Accelerator`.

:func:`probe` and :func:`resolve_device` are the only places that ask torch
about the hardware (:func:`cpu_autocast_fp16` asks, once, what this torch can
do); every decision takes the probed (or, in tests, a made-up) accelerator and
returns a value, so each rule is checked for a T4, an A100 or a CPU anywhere.
:func:`plan_device` gathers the decisions into one :class:`DevicePlan`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.errors import PipelineError

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
INPUT_KINDS = ("files", "image_cache", "features")  # image files / uint8 tensors / 2-D features
_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_FILE_WORKERS = 8  # beyond ~8 JPEG decoders per GPU the returns vanish and RAM grows


@dataclass(frozen=True)
class Accelerator:
    """What a run computes on: kind, CUDA compute capability, name, devices visible, the CPU's architecture."""
    type: str  # "cpu" | "cuda" | "mps"
    capability: tuple[int, int] | None
    name: str
    count: int = 1
    arch: str = ""  # platform.machine() of a CPU: "x86_64", "arm64", "aarch64"


def gpu(capability: tuple[int, int], name: str, count: int = 1) -> Accelerator:
    """A CUDA accelerator from its facts, for tests and dry runs."""
    return Accelerator("cuda", capability, name, count)


CPU = Accelerator("cpu", None, "cpu", arch="x86_64")
ARM_CPU = Accelerator("cpu", None, "cpu", arch="arm64")  # an Apple laptop's, a Graviton's
X86 = ("x86_64", "amd64", "x86", "i386", "i686")
P100 = gpu((6, 0), "Tesla P100-PCIE-16GB")
V100 = gpu((7, 0), "Tesla V100-SXM2-16GB")
T4 = gpu((7, 5), "Tesla T4")
A100 = gpu((8, 0), "NVIDIA A100-SXM4-40GB")
H100 = gpu((9, 0), "NVIDIA H100 80GB HBM3")


def probe(device: torch.device) -> Accelerator:
    """Read the facts about ``device`` from torch; every decision below starts from this."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Accelerator("cuda", tuple(torch.cuda.get_device_capability(index)),
                           torch.cuda.get_device_name(index), torch.cuda.device_count())
    if device.type == "mps":
        return Accelerator("mps", None, "Apple MPS")
    return Accelerator("cpu", None, platform.processor() or "cpu", arch=platform.machine().lower())


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    """auto -> cuda when visible, else cpu; under torchrun each rank takes its local GPU.

    The rank comes from
    ``local_rank`` or, when WORLD_SIZE > 1, the LOCAL_RANK torchrun sets.
    """
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", requested):
        raise PipelineError(f"--device {requested!r}: use auto, cpu, cuda, cuda:N or mps")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"--device {requested}: no CUDA GPU is visible; use --device cpu or auto")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("--device mps: no Apple GPU is available; use --device cpu or auto")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if local_rank is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def _cap(acc: Accelerator) -> tuple[int, int]:
    return acc.capability or (0, 0)


def ddp_backend(acc: Accelerator) -> str:
    """NCCL only when this run computes on CUDA: gloo handles CPU tensors, NCCL cannot,
    so ``--device cpu`` on a GPU machine must still use gloo."""
    return "nccl" if acc.type == "cuda" else "gloo"


@functools.cache
def cpu_autocast_fp16() -> bool:
    """Whether CPU autocast in this torch casts to float16 (older releases warned and ran fp32)."""
    a = torch.ones(2, 2)
    with torch.autocast("cpu", dtype=torch.float16):
        return torch.mm(a, a).dtype == torch.float16


def autocast_dtype(requested: str, acc: Accelerator) -> torch.dtype | None:
    """The autocast dtype for ``--amp requested`` on ``acc`` (None: full fp32).

    auto: bf16 where the tensor cores do it natively (capability >= 8.0); fp16
    on older GPUs from Pascal (6.0) on, where bf16 is emulated and slow; nothing
    on CPU/MPS, where autocast is slower than fp32 for these models. An explicit
    choice is honoured everywhere (bf16 on CPU lets CI exercise the GPU's
    precision path), except fp16 on a CPU whose torch cannot autocast to it.
    """
    if requested not in AMP_CHOICES:
        raise PipelineError(f"--amp {requested!r}: choose one of {', '.join(AMP_CHOICES)}")
    if requested == "auto":
        if acc.type != "cuda" or _cap(acc) < (6, 0):
            return None
        return torch.bfloat16 if _cap(acc) >= (8, 0) else torch.float16
    if requested == "fp16" and acc.type == "cpu" and not cpu_autocast_fp16():
        return None
    return _DTYPES[requested]


def precision_warning(requested: str, acc: Accelerator) -> str | None:
    """A one-line warning when an explicit --amp is honoured but a poor fit for ``acc``."""
    if requested == "bf16" and acc.type == "cuda" and _cap(acc) < (8, 0):
        major, minor = _cap(acc)
        return (f"bf16 on {acc.name} (capability {major}.{minor}) is emulated and slow; "
                "use --amp fp16 or auto")
    if requested == "fp16" and acc.type == "cpu" and autocast_dtype(requested, acc) is None:
        return "fp16 autocast is not supported on CPU by this torch; running fp32 (use --amp bf16)"
    return None


def needs_grad_scaler(dtype: torch.dtype | None, acc: Accelerator) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.

    The scaler is built as ``torch.amp.GradScaler(acc.type)``: CUDA, and CPU
    (torch >= 2.3) when an explicit fp16 was honoured there.
    """
    return dtype == torch.float16 and acc.type in ("cuda", "cpu")


def use_channels_last(requested: bool | None, acc: Accelerator, batch_ndim: int) -> bool:
    """NHWC memory format for image batches: only ever for 4-D tensors (a 2-D
    feature batch has no channels_last). None (auto): on for CUDA from Volta
    (7.0), whose tensor-core convolutions are NHWC-native, and on x86 CPUs,
    where oneDNN's NHWC kernels were faster for every network measured (torch
    2.14, 2 cores: a FastNet training step 1.2-1.4x, ResNet-18 1.1-1.2x, the
    EfficientNet-Lite0 backbone's inference 1.8x; max pooling 18x); off on
    other CPUs (not measured), MPS and older GPUs. An explicit choice is
    honoured everywhere."""
    if batch_ndim != 4:
        return False
    if requested is not None:
        return requested
    if acc.type == "cpu":
        return acc.arch in X86
    return acc.type == "cuda" and _cap(acc) >= (7, 0)


def _check_kind(input_kind: str) -> None:
    if input_kind not in INPUT_KINDS:
        raise PipelineError(f"input kind {input_kind!r}: choose one of {', '.join(INPUT_KINDS)}")


def default_workers(cpu_count: int, acc: Accelerator, world_size: int, input_kind: str) -> int:
    """DataLoader workers per process when --num-workers is not given.

    Tensors already in memory (image cache, features) are indexed, not decoded:
    workers would only add start-up and copies, so 0. Image files need decoding:
    with a GPU computing, each process gets its share of the cores minus one for
    the main loop (capped at 8). On CPU the model's own threads use every core,
    so at most 2 workers overlap decoding with compute without starving it.
    """
    _check_kind(input_kind)
    if input_kind != "files":
        return 0
    per_process = max(cpu_count, 1) // max(world_size, 1) - 1
    cap = _MAX_FILE_WORKERS if acc.type != "cpu" else 2
    return max(0, min(cap, per_process))


def pin_memory(acc: Accelerator, input_kind: str) -> bool:
    """Page-locked batches let host-to-GPU copies run async; only worth it on CUDA for
    batches built by workers (files). In-memory tensors read with 0 workers would
    be pinned on the main thread: an extra copy with nothing to overlap."""
    _check_kind(input_kind)
    return acc.type == "cuda" and input_kind == "files"


def non_blocking(acc: Accelerator) -> bool:
    """Async host-to-device copies on CUDA; a no-op on CPU, and MPS has had races with it."""
    return acc.type == "cuda"


def ddp_find_unused(input_kind: str, has_aux_heads: bool) -> bool:
    """Whether DistributedDataParallel must look for parameters a step leaves without gradient.

    A head trained on cached features runs only the main classifier, so a model
    with auxiliary classifiers (GoogLeNet) has trainable aux parameters that
    never get a gradient, which DDP rejects unless told to look for them. Every
    other combination uses all trainable parameters, and the search costs a
    graph traversal per step, so it stays off there.
    """
    _check_kind(input_kind)
    return input_kind == "features" and has_aux_heads


def available_cpus() -> int:
    """Cores this process may run on (the affinity mask in a container, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cudnn_benchmark(acc: Accelerator) -> bool:
    """Input sizes are fixed per run, so let cuDNN time and pick its fastest kernels (CUDA only)."""
    return acc.type == "cuda"


@dataclass(frozen=True)
class DevicePlan:
    """Every device decision for one run, resolved once and written with the run."""
    device_type: str
    device_name: str
    capability: tuple[int, int] | None
    amp_dtype: str  # "bf16" | "fp16" | "none"
    grad_scaler: bool
    channels_last: bool
    cudnn_benchmark: bool
    workers: int
    pin_memory: bool
    non_blocking: bool
    backend: str
    warnings: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype | None:
        """The torch dtype for ``torch.autocast`` (None: no autocast)."""
        return _DTYPES[self.amp_dtype]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types (lists for tuples), for the run directory."""
        d = asdict(self)
        d["capability"] = list(self.capability) if self.capability else None
        d["warnings"] = list(self.warnings)
        return d


def plan_device(acc: Accelerator, *, amp: str, channels_last: bool | None, num_workers: int | None,
                world_size: int, cpu_count: int, input_kind: str) -> DevicePlan:
    """All decisions for ``acc``; an explicit ``num_workers`` wins over the default."""
    dtype = autocast_dtype(amp, acc)
    name = {v: k for k, v in _DTYPES.items()}[dtype]
    warning = precision_warning(amp, acc)
    batch_ndim = 2 if input_kind == "features" else 4
    workers = default_workers(cpu_count, acc, world_size, input_kind) if num_workers is None else num_workers
    return DevicePlan(
        device_type=acc.type, device_name=acc.name, capability=acc.capability, amp_dtype=name,
        grad_scaler=needs_grad_scaler(dtype, acc),
        channels_last=use_channels_last(channels_last, acc, batch_ndim),
        cudnn_benchmark=cudnn_benchmark(acc), workers=workers,
        pin_memory=pin_memory(acc, input_kind), non_blocking=non_blocking(acc),
        backend=ddp_backend(acc), warnings=(warning,) if warning else ())


def device_plan(cfg: Any, acc: Accelerator, input_kind: str, *, world_size: int = 1, cpu_count: int = 1,
                amp: str | None = None) -> DevicePlan:
    """The device decisions for a run's config (a TrainConfig) on ``acc`` for what it consumes (pure).

    ``amp`` overrides the config's (predict passes the dtype a run was trained with).
    """
    return plan_device(acc, amp=amp or cfg.amp, channels_last=cfg.channels_last, num_workers=cfg.num_workers,
                       world_size=world_size, cpu_count=cpu_count, input_kind=input_kind)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for ``dtype`` on ``device``; nothing when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- memory: the batch of inference, from a budget
# A no-grad forward pass holds its batch's inputs and a few layers' activations; past a few dozen images a CPU
# computes no faster (its cores are busy from the first) and a GPU only up to its memory. So inference and feature
# extraction batches come from the memory free at the start, not from the training batch: 256 images of 224 px
# in fp32 took 5.4 GB of RAM on a CPU for no speed-up (issue 26).

BUDGET_FRACTION = 0.25  # of the free memory: the rest stays with the model, the caches and other work
ACTIVATION_FACTOR = 36  # live activations of a no-grad pass per input byte: lite0 at 224 px 31-36, resnet34 11
CPU_MAX_PIXELS = 32 * 224 * 224  # a CPU's speed is flat from ~16 images of 224 px a batch; small images: more
CUDA_MAX_BATCH = 1024
PREFETCH = 4  # batches each DataLoader worker keeps ready (pipeline/data/loaders.py, prefetch_factor)


def item_bytes(acc: Accelerator, image_size: int, *, half_precision: bool = False, workers: int = 0) -> int:
    """Memory one more image in a batch costs where ``acc`` computes (pure): its activations (half the size
    under fp16/bf16 autocast on a GPU) and its fp32 input, which on CPU also waits in every worker's
    prefetched batches in the same RAM."""
    one = 4 * 3 * image_size * image_size
    activations = one * ACTIVATION_FACTOR // (2 if half_precision and acc.type == "cuda" else 1)
    return activations + (one if acc.type == "cuda" else one * (workers * PREFETCH + 1))


def batch_for_budget(acc: Accelerator, available: int, per_item: int, image_size: int, *,
                     fraction: float = BUDGET_FRACTION, processes: int = 1) -> int:
    """Images per inference batch with ``available`` bytes free (pure): the largest power of two that fits
    in ``fraction`` of them, at least 1.

    CPU (and MPS): the memory is the host's RAM, shared by the ``processes`` of
    a torchrun on it, and the batch stops at CPU_MAX_PIXELS (32 images of 224
    px), where the speed stops growing. CUDA: the GPU's own free memory, one
    process per GPU, up to CUDA_MAX_BATCH.
    """
    share = available if acc.type == "cuda" else available // max(processes, 1)
    fit = max(1, int(share * fraction) // max(per_item, 1))
    cap = CUDA_MAX_BATCH if acc.type == "cuda" else max(1, CPU_MAX_PIXELS // (image_size * image_size))
    return 1 << (min(fit, cap).bit_length() - 1)


TRAIN_FACTOR = 3  # a training step keeps its activations for backward, plus their gradients: ~3x a no-grad pass


def train_batch_candidates(acc: Accelerator, available: int, per_item: int, image_size: int, limit: int, *,
                           processes: int = 1) -> tuple[int, ...]:
    """--batch-size auto: the training batches to try, largest first (pure). ``per_item``: an inference
    image's bytes (:func:`item_bytes`); ``limit``: the largest batch the data allows.

    CPU (and MPS): one batch, never probed: :func:`batch_for_budget` of the
    training cost. Running out of the host's RAM raises nothing a probe could
    catch (the kernel's OOM killer ends the process, or swap slows it down), and
    a CPU's speed stops growing at CPU_MAX_PIXELS anyway. CUDA: out of memory is
    an exception, so the real limit is probed: from twice the largest batch the
    estimate fits in all the free memory (the estimate is rough) down to 1,
    halving; the first batch that completes a few steps wins.
    """
    cost = per_item * TRAIN_FACTOR
    if acc.type != "cuda":
        return (max(1, min(batch_for_budget(acc, available, cost, image_size, processes=processes), limit)),)
    top = max(1, min(2 * batch_for_budget(acc, available, cost, image_size, fraction=1.0), CUDA_MAX_BATCH, limit))
    return tuple(top >> i for i in range(top.bit_length()))


def host_available(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int:
    """Bytes of RAM this process may still take: MemAvailable, within a container's memory limit."""
    def read(path: str) -> str:
        with open(path, encoding="ascii") as fh:
            return fh.read()

    found = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in read(meminfo).splitlines() if x.startswith("MemAvailable:"))
        found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = read(os.path.join(cgroup, "memory.max")).strip()
        if limit != "max":
            found.append(max(0, int(limit) - int(read(os.path.join(cgroup, "memory.current")))))
    return min(found) if found else 4 * 1024 ** 3  # macOS, Windows: assume a small machine


def available_memory(device: torch.device) -> int:
    """Free bytes where ``device`` computes: the GPU's own on CUDA, else the host's RAM."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available()


def inference_batch(cfg: Any, device: torch.device, *, workers: int = 0, half_precision: bool = False,
                    processes: int = 1) -> int:
    """Images per batch of a run's feature extraction and inference on ``device``: cfg.infer_batch_size when
    set, else :func:`batch_for_budget` of the memory free now for cfg.image_size."""
    if getattr(cfg, "infer_batch_size", None):
        return cfg.infer_batch_size
    acc = probe(device)
    per_item = item_bytes(acc, cfg.image_size, half_precision=half_precision, workers=workers)
    return batch_for_budget(acc, available_memory(device), per_item, cfg.image_size, processes=processes)
