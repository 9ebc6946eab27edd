"""GPU paths on this CPU machine: what torch and DeepSpeed do differently on a GPU, made to
happen here (an emulated view, a stand-in device, or the call a GPU run would make, recorded).

DeepSpeed under bf16 / fp16: on a GPU, DeepSpeed's engine sees the loop's ``torch.autocast("cuda")`` (its check,
``torch.is_autocast_enabled()`` with no device, reports the CUDA state) and turns autocast off
inside its forward, while its bf16/fp16 section has cast the module's parameters to that dtype:
a model fed fp32 tensors failed at its first layer. On a CPU that check never sees an autocast, so
the same run passed. These tests make DeepSpeed's check report the CPU's autocast state, as the
CUDA one would be reported on a GPU, and train through the very code the CLI runs.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from conftest import spawn


def _as_on_a_gpu() -> None:
    """DeepSpeed's nested-autocast check sees the CPU's autocast state (a GPU's view of its own)."""
    import deepspeed.runtime.torch_autocast as ds_autocast

    real = torch.is_autocast_enabled

    class TorchSeenByDeepSpeed:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def is_autocast_enabled(*device):
            return real(*device) if device else real("cpu")

    ds_autocast.torch = TorchSeenByDeepSpeed()


def _train(rank: int, world: int, precision: str) -> None:
    _as_on_a_gpu()
    from dist_train.config import load_config
    from dist_train.env.cluster import detect
    from dist_train.train.build import build_training
    from dist_train.train.evaluate import evaluate
    from dist_train.train.step import train_step
    from dist_train.train.tasks import Classification

    job = load_config(None, ["model.name=mlp", "data.name=digits", "model.hidden=32", "strategy.name=deepspeed",
                             f"train.precision={precision}", "train.lr=1e-2", "train.warmup_steps=0",
                             "data.batch_size=16"])
    info = SimpleNamespace(task="classification", input_shape=(64,), num_classes=10)
    strategy = build_training(job, detect(), torch.device("cpu"), info)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    # The module computes in the engine's dtype, takes fp32 inputs, gives fp32 outputs.
    assert next(strategy.unwrapped_model.parameters()).dtype == strategy.precision.dtype
    with strategy.autocast():
        out = strategy.model(x)
    assert out.dtype == torch.float32, out.dtype
    losses = []
    for _ in range(12):
        losses.append(float(train_step(strategy, iter([(x, y)]), job.train).loss))
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.8 * losses[0], f"{precision}: the loss did not fall: {losses}"
    metrics = evaluate(strategy, [(x, y)], Classification())  # (under the same autocast() as training)
    assert all(math.isfinite(float(v)) for v in metrics.values()), metrics
    strategy.teardown()


def test_deepspeed_bf16_takes_fp32_inputs_as_on_a_gpu():
    """(fp16 takes the same path on a GPU; DeepSpeed refuses fp16 on a CPU.)"""
    spawn(_train, 2, "bf16")


class _Reduced(Exception):
    """Raised by the recording all-reduce below, with the device it was handed."""


def _grad_norms_reduce_on_the_strategy_device(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from dist_train.strategy import base

    def recording(tensor, op="sum", group=None):
        raise _Reduced(tensor.device)

    base.all_reduce = recording
    mesh = init_device_mesh("cpu", (world_size,))
    # FSDP's gradients under CPU offload: host shards, while the strategy's device (and the mesh's
    # NCCL group) is a GPU. "meta" stands in for that other device here.
    grads = [DTensor.from_local(torch.ones(4, 3), mesh, [Shard(0)], run_check=False),
             DTensor.from_local(torch.ones(2), mesh, [Shard(0)], run_check=False)]
    other = torch.device("meta")
    with pytest.raises(_Reduced) as seen:
        base.global_grad_norm(grads, other)
    assert seen.value.args[0] == other, seen.value.args
    strategy = SimpleNamespace(device=other, _named_grads=lambda: iter([("a.weight", grads[0]), ("b.bias", grads[1])]))
    with pytest.raises(_Reduced) as seen:
        base.Strategy.module_grad_norms(strategy, 2)
    assert seen.value.args[0] == other, seen.value.args


def test_gradient_norms_of_offloaded_shards_are_reduced_on_the_strategy_device():
    """strategy.fsdp.cpu_offload on a GPU: the sharded gradients are on the host, and the mesh's NCCL
    group reduces only GPU tensors: the global norm (every step) and the per-module norms
    (logging.grad_norms) must all-reduce on the strategy's device, not where the shards are."""
    spawn(_grad_norms_reduce_on_the_strategy_device, 1)


class _Initialized(Exception):
    """Raised by the recording deepspeed.initialize below, with the args it was given."""


def test_deepspeed_runs_on_the_ranks_own_gpu_when_each_task_sees_one(monkeypatch):
    """SLURM --gpus-per-task=1: task 3 of a node sees one GPU, cuda:0, while its local rank (which
    DeepSpeed would take as its device index) is 3: the engine is told the strategy's device."""
    import deepspeed

    from dist_train.config import load_config
    from dist_train.env.cluster import ClusterEnv
    from dist_train.strategy import StepPlan, build_strategy

    def recording(args=None, **kwargs):
        raise _Initialized(args)

    monkeypatch.setattr(deepspeed, "initialize", recording)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: None)
    monkeypatch.setenv("LOCAL_RANK", "3")  # (SLURM_LOCALID's value)
    job = load_config(None, ["strategy.name=deepspeed"])
    cluster = ClusterEnv(source="slurm", rank=3, local_rank=3, world_size=8, local_world_size=8)
    strategy = build_strategy(job.strategy, cluster, torch.device("cuda", 0), "fp32", StepPlan(8, 1, 0.0))

    class Model(torch.nn.Linear):
        def to(self, *args, **kwargs):  # (no GPU here to move it to)
            return self

    with pytest.raises(_Initialized) as seen:
        strategy.setup(Model(2, 2), lambda module: torch.optim.SGD(module.parameters(), lr=0.1),
                       lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0))
    assert seen.value.args[0].device_rank == 0, vars(seen.value.args[0])
    assert os.environ["LOCAL_RANK"] == "0"  # (ZeRO-3's zero.Init takes its device from it)
    strategy.teardown()  # (fit runs in the user's process: its environment is given back)
    assert os.environ["LOCAL_RANK"] == "3"


def test_bf16_on_a_gpu_before_ampere_is_checked_without_touching_a_device(monkeypatch, caplog):
    """torch.cuda.is_bf16_supported() makes a tensor on GPU 0 before Ampere (a CUDA context there in
    every rank for the whole run): preflight reads the rank's own GPU's capability instead, and
    says that bf16 is emulated there."""
    from dist_train.config import load_config
    from dist_train.env.cluster import ClusterEnv
    from dist_train.preflight import preflight

    def refused(*args, **kwargs):
        raise AssertionError("torch.cuda.is_bf16_supported() called")

    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", refused)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (7, 0))
    job = load_config(None, ["model.name=mlp", "data.name=digits", "train.precision=bf16", "strategy.name=ddp"])
    for rank in (0, 5):
        preflight(job, ClusterEnv(source="torchrun", rank=rank, local_rank=rank, world_size=8, local_world_size=8),
                  machine=False)
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 5)], asked
    warnings = [r.getMessage() for r in caplog.records if "bf16" in r.getMessage()]
    assert len(warnings) == 1 and "emulates" in warnings[0], warnings  # (once: rank 0)


def test_fsdp_cpu_offload_keeps_buffers_on_the_device_the_forward_runs_on():
    """strategy.fsdp.cpu_offload with meta_init (the default): the model was materialised in host
    memory whole, buffers too, and neither CPUOffloadPolicy (parameters only) nor fully_shard (which
    moved only real buffers, these were on meta) put them back: a GPU forward met BatchNorm's host
    statistics. "meta" stands in for the GPU here."""
    from dist_train.config import load_config
    from dist_train.env.cluster import ClusterEnv
    from dist_train.models import build_model
    from dist_train.strategy import StepPlan, build_strategy

    job = load_config(None, ["strategy.name=fsdp", "strategy.fsdp.cpu_offload=true", "model.name=resnet18"])
    cluster = ClusterEnv(source="torchrun", rank=0, local_rank=0, world_size=1, local_world_size=1)
    strategy = build_strategy(job.strategy, cluster, torch.device("meta"), "fp32", StepPlan(8, 1, 0.0))
    with strategy.init_context():
        model = build_model(job.model, SimpleNamespace(task="classification", input_shape=(3, 8, 8), num_classes=10))
    strategy._materialise(model)
    assert {b.device.type for b in model.buffers()} == {"meta"}  # (the strategy's device)
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # (fully_shard then offloads the shards)


def test_the_cuda_rng_state_is_this_ranks_devices_whatever_the_layout(monkeypatch):
    """Every visible device's CUDA RNG state was saved, and restored only on a machine with as many:
    a resume under SLURM's one GPU per task of a torchrun run (8 visible) lost the exact resume.
    Now the rank's current device's state goes into its own device. (torch.cuda stands in here.)"""
    from dist_train.env import seed

    mine, restored = torch.tensor([7, 7], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": mine)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    state = seed.rng_state()
    assert torch.equal(state["torch_cuda_current"], mine) and "torch_cuda" not in state
    seed.set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], mine)


def test_the_launcher_refuses_more_ranks_than_gpus_before_any_starts(monkeypatch, capsys):
    """--nproc_per_node=4 on a node with 2 visible GPUs: two ranks shared each GPU and NCCL failed
    once every rank had started ("Duplicate GPU detected"). Refused up front (exit 2), naming both.
    (torch.cuda stands in for the GPUs here.)"""
    from dist_train import launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.main(["--standalone", "--nproc_per_node=4", "train.max_steps=1"]) == 2
    assert "--nproc_per_node=4 starts 4 ranks on this node, which has 2 GPU(s)" in capsys.readouterr().err
    assert launch._more_ranks_than_gpus(2) == ""
    assert launch._more_ranks_than_gpus(4, "gloo") == ""  # (dist.backend=gloo: ranks may share a GPU)


def test_dist_backend_is_checked_against_the_machine_and_the_strategy(monkeypatch, capsys):
    """dist.backend=nccl without a GPU, and gloo on GPUs under a strategy that needs reduce-scatter
    (FSDP, DeepSpeed), stop before any process group with exit 2 naming the key; gloo on GPUs with
    DDP passes. (torch.cuda stands in for a GPU in the second half.)"""
    from dist_train import cli
    from dist_train.env.cluster import backend_for

    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for(torch.device("cuda", 0), "gloo") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["--check", "dist.backend=nccl"]) == 2
    assert "dist.backend: nccl needs CUDA GPUs" in capsys.readouterr().err
    assert cli.main(["--check", "dist.backend=mpi"]) == 2
    assert "dist.backend: must be one of auto, nccl, gloo" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["--check", "dist.backend=gloo", "strategy.name=fsdp"]) == 2
    assert "dist.backend: gloo on GPUs runs strategy.name=single or ddp; fsdp" in capsys.readouterr().err
    assert cli.main(["--check", "dist.backend=gloo", "strategy.name=ddp"]) == 0


def test_batches_of_any_mapping_type_reach_the_device():
    """A dataset's own ``__getitems__`` may return a Mapping that is not a dict: its tensors stayed
    on the host, where a GPU's forward refuses them (the meta device stands in for the GPU)."""
    from collections.abc import Mapping
    from types import MappingProxyType

    from dist_train.train.tasks import to_device

    class Batch(Mapping):
        def __init__(self, **items):
            self._items = items

        def __getitem__(self, key):
            return self._items[key]

        def __iter__(self):
            return iter(self._items)

        def __len__(self):
            return len(self._items)

    meta = torch.device("meta")
    for batch in (Batch(x=torch.ones(2, 3), y=[torch.zeros(2)]), MappingProxyType({"x": torch.ones(2, 3), "y": [torch.zeros(2)]})):
        moved = to_device(batch, meta)
        assert moved["x"].device == meta and moved["y"][0].device == meta and moved["x"].shape == (2, 3)
