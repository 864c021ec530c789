"""Device decisions, checked against written-out tables for GPUs this machine does not have."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import devices
from pipeline.devices import (A100, ARM_CPU, CPU, H100, P100, T4, V100, Accelerator, autocast_dtype, cudnn_benchmark,
                              ddp_backend, default_workers, gpu, needs_grad_scaler, non_blocking, pin_memory,
                              plan_device, precision_warning, probe, resolve_device, use_channels_last)
from pipeline.errors import PipelineError

MPS = Accelerator("mps", None, "Apple MPS")
MAXWELL = gpu((5, 2), "Tesla M60")
ACCS = {"CPU": CPU, "P100": P100, "V100": V100, "T4": T4, "A100": A100, "H100": H100,
        "MPS": MPS, "M60": MAXWELL, "ARM": ARM_CPU}
BF16, FP16 = torch.bfloat16, torch.float16
KINDS = ("files", "image_cache", "features")


def _table(rows: dict[str, object]) -> list:
    return [pytest.param(ACCS[k], v, id=k) for k, v in rows.items()]


@pytest.mark.parametrize("acc, expected", _table(
    {"CPU": "gloo", "P100": "nccl", "V100": "nccl", "T4": "nccl", "A100": "nccl", "H100": "nccl", "MPS": "gloo"}))
def test_ddp_backend_nccl_only_for_cuda_runs(acc, expected):
    assert ddp_backend(acc) == expected


# columns: auto, none, bf16, fp16
AMP = {"CPU": (None, None, BF16, FP16), "P100": (FP16, None, BF16, FP16), "V100": (FP16, None, BF16, FP16),
       "T4": (FP16, None, BF16, FP16), "A100": (BF16, None, BF16, FP16), "H100": (BF16, None, BF16, FP16),
       "MPS": (None, None, BF16, FP16), "M60": (None, None, BF16, FP16)}


@pytest.mark.parametrize("acc, expected", _table(AMP))
def test_autocast_dtype_table(acc, expected):
    got = tuple(autocast_dtype(r, acc) for r in ("auto", "none", "bf16", "fp16"))
    assert got == expected


def test_explicit_fp16_on_cpu_falls_back_when_torch_cannot(monkeypatch):
    monkeypatch.setattr(devices, "cpu_autocast_fp16", lambda: False)
    assert autocast_dtype("fp16", CPU) is None
    assert "not supported on CPU" in precision_warning("fp16", CPU)
    assert autocast_dtype("fp16", T4) == FP16  # only the CPU path depends on it


def test_cpu_fp16_probe_matches_a_real_conv():
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.autocast("cpu", dtype=FP16):
        out = conv(torch.randn(1, 3, 8, 8))
    assert (out.dtype == FP16) == devices.cpu_autocast_fp16()


def test_unknown_amp_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="--amp 'fp8'.*auto, none, bf16, fp16"):
        autocast_dtype("fp8", A100)


@pytest.mark.parametrize("acc, warns", _table(
    {"CPU": False, "P100": True, "V100": True, "T4": True, "A100": False, "H100": False, "MPS": False}))
def test_bf16_warning_only_where_it_is_emulated(acc, warns):
    msg = precision_warning("bf16", acc)
    assert (msg is not None) == warns
    if warns:
        major, minor = acc.capability
        assert acc.name in msg and f"capability {major}.{minor}" in msg and "--amp fp16" in msg
    for requested in ("auto", "none", "fp16"):
        assert precision_warning(requested, acc) is None or acc.type == "cpu"


@pytest.mark.parametrize("dtype, acc, expected", [
    (FP16, T4, True), (FP16, P100, True), (FP16, H100, True), (BF16, A100, False), (BF16, T4, False),
    (None, V100, False), (BF16, CPU, False), (None, CPU, False), (FP16, CPU, True), (FP16, MPS, False)])
def test_grad_scaler_only_for_fp16(dtype, acc, expected):
    assert needs_grad_scaler(dtype, acc) is expected


@pytest.mark.parametrize("acc, expected", _table(
    {"CPU": True, "ARM": False, "P100": False, "V100": True, "T4": True, "A100": True, "H100": True, "MPS": False}))
def test_channels_last_auto_from_volta_on_and_on_x86_cpus(acc, expected):
    assert use_channels_last(None, acc, 4) is expected
    assert use_channels_last(True, acc, 4) is True  # explicit on is honoured, CPU included
    assert use_channels_last(False, acc, 4) is False


def test_a_probed_cpu_knows_its_architecture():
    import platform

    acc = devices.probe(torch.device("cpu"))
    assert acc.type == "cpu" and acc.arch == platform.machine().lower() != ""
    assert use_channels_last(None, acc, 4) is (acc.arch in devices.X86)


@pytest.mark.parametrize("acc", ACCS.values(), ids=ACCS.keys())
@pytest.mark.parametrize("requested", [None, True, False])
@pytest.mark.parametrize("ndim", [2, 3, 5])
def test_channels_last_never_for_non_image_batches(acc, requested, ndim):
    assert use_channels_last(requested, acc, ndim) is False


# (accelerator, cpu_count, world_size) -> workers for image files; in-memory kinds always 0
WORKERS = [("CPU", 8, 1, 2), ("CPU", 8, 2, 2), ("CPU", 4, 2, 1), ("CPU", 2, 1, 1), ("CPU", 2, 2, 0),
           ("CPU", 1, 1, 0), ("T4", 8, 1, 7), ("T4", 8, 2, 3), ("A100", 32, 1, 8), ("H100", 32, 2, 8),
           ("H100", 16, 2, 7), ("P100", 2, 1, 1), ("V100", 4, 2, 1), ("A100", 2, 2, 0), ("MPS", 8, 1, 7)]


@pytest.mark.parametrize("name, cores, world, expected", WORKERS)
@pytest.mark.parametrize("kind", KINDS)
def test_default_workers_table(name, cores, world, expected, kind):
    want = expected if kind == "files" else 0
    assert default_workers(cores, ACCS[name], world, kind) == want


def test_unknown_input_kind_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="'jpeg'"):
        default_workers(8, T4, 1, "jpeg")
    with pytest.raises(PipelineError, match="'jpeg'"):
        pin_memory(T4, "jpeg")


@pytest.mark.parametrize("acc", ACCS.values(), ids=ACCS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_pin_memory_non_blocking_cudnn(acc, kind):
    cuda = acc.type == "cuda"
    assert pin_memory(acc, kind) is (cuda and kind == "files")
    assert non_blocking(acc) is cuda
    assert cudnn_benchmark(acc) is cuda


def _plan(acc, **kw):
    args = dict(amp="auto", channels_last=None, num_workers=None, world_size=1, cpu_count=8, input_kind="files")
    return plan_device(acc, **{**args, **kw})


@pytest.mark.parametrize("name, amp, scaler, channels_last, workers, backend", [
    ("CPU", "none", False, True, 2, "gloo"), ("P100", "fp16", True, False, 7, "nccl"),
    ("V100", "fp16", True, True, 7, "nccl"), ("T4", "fp16", True, True, 7, "nccl"),
    ("A100", "bf16", False, True, 7, "nccl"), ("H100", "bf16", False, True, 7, "nccl")])
def test_plan_device_auto(name, amp, scaler, channels_last, workers, backend):
    plan = _plan(ACCS[name])
    assert (plan.amp_dtype, plan.grad_scaler, plan.channels_last, plan.workers, plan.backend) == \
        (amp, scaler, channels_last, workers, backend)
    assert plan.dtype == AMP[name][0] and plan.warnings == ()
    assert plan.device_type == ACCS[name].type and plan.capability == ACCS[name].capability


def test_plan_device_explicit_overrides_and_warning():
    plan = _plan(T4, amp="bf16", channels_last=False, num_workers=0, world_size=2)
    assert (plan.amp_dtype, plan.grad_scaler, plan.channels_last, plan.workers) == ("bf16", False, False, 0)
    assert len(plan.warnings) == 1 and "Tesla T4 (capability 7.5)" in plan.warnings[0]
    cpu = _plan(CPU, amp="bf16", channels_last=True, num_workers=5)
    assert (cpu.dtype, cpu.channels_last, cpu.workers, cpu.backend) == (BF16, True, 5, "gloo")


def test_plan_device_features_never_channels_last_nor_workers():
    plan = _plan(H100, channels_last=True, input_kind="features")
    assert (plan.channels_last, plan.workers, plan.pin_memory) == (False, 0, False)


@pytest.mark.parametrize("acc", [CPU, T4, A100], ids=["CPU", "T4", "A100"])
def test_plan_to_json_round_trips(acc):
    plan = _plan(acc, amp="bf16", world_size=2)
    data = json.loads(json.dumps(plan.to_json()))
    assert data == plan.to_json()
    assert data["capability"] == (list(acc.capability) if acc.capability else None)
    assert data["warnings"] == list(plan.warnings) and data["amp_dtype"] == "bf16"
    assert type(plan)(**{**data, "capability": plan.capability, "warnings": plan.warnings}) == plan


def test_probe_cpu_and_resolve_device(monkeypatch):
    acc = probe(torch.device("cpu"))
    assert (acc.type, acc.capability, acc.count) == ("cpu", None, 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(PipelineError, match="use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PipelineError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda:1")


def test_resolve_device_gives_each_torchrun_rank_its_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_cuda_reads_the_real_gpu():
    acc = probe(torch.device("cuda"))
    assert acc.type == "cuda" and acc.capability == torch.cuda.get_device_capability()
    assert acc.count == torch.cuda.device_count() and acc.name


def test_cpu_bf16_autocast_and_channels_last_really_run():
    dtype = autocast_dtype("bf16", CPU)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    assert use_channels_last(True, CPU, x.ndim)
    x = x.contiguous(memory_format=torch.channels_last)
    conv = conv.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("aux", [True, False])
def test_ddp_looks_for_unused_parameters_only_for_aux_heads_under_a_feature_head(kind, aux):
    assert devices.ddp_find_unused(kind, aux) is (kind == "features" and aux)


def test_available_cpus_is_this_process_share():
    assert 1 <= devices.available_cpus() <= (__import__("os").cpu_count() or 1)


@pytest.mark.parametrize("requested, backend", [("cpu", "gloo"), ("auto", "nccl"), ("cuda", "nccl")])
def test_distributed_init_takes_the_backend_of_the_runs_device(monkeypatch, requested, backend):
    """On a GPU machine, --device cpu under torchrun must join with gloo: NCCL cannot carry CPU tensors."""
    from pipeline import distributed

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: joined.append(("device", i)))
    monkeypatch.setattr(distributed, "probe", lambda d: T4 if d.type == "cuda" else CPU)
    monkeypatch.setattr(distributed.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.tdist, "init_process_group", lambda backend, timeout: joined.append(backend))
    assert distributed.init(requested) is True
    assert joined[-1] == backend
    assert (("device", 1) in joined) is (backend == "nccl")  # each rank on its own GPU
