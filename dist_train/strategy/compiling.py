"""``train.compile``: how each strategy hands its model to ``torch.compile``.

Always in place (``nn.Module.compile()``): the module keeps its class and its parameter names, so
state dicts, checkpoints and exports are the same with and without compile.
``torch.compile(module)`` would instead return an ``OptimizedModule`` whose parameters are named
``_orig_mod.<name>``, and that prefix would reach every checkpoint.

Where each strategy compiles (compilation itself is lazy: it happens at the first forward):

    single     the whole model
    ddp        the module inside the DDP wrapper: the task runs it inside DDP's forward
               (``DDPStrategy.run_task``), where TorchDynamo's DDPOptimizer splits the graph at
               the gradient buckets, so the all-reduce of one bucket still overlaps the backward
               of the next
    fsdp       each FSDP block, before ``fully_shard`` (as torchtitan does); FSDP's hooks stay
               outside the compiled code (TorchDynamo skips FSDP hooks) and run eagerly between
               the blocks; the root's own layers (embeddings, head) stay eager
    deepspeed  the engine's ``compile()``, which compiles its module in place
"""
from __future__ import annotations


def wanted(strategy) -> bool:
    """``train.compile`` as the job builder gave it to ``strategy`` (``Strategy.compile``)."""
    return bool(getattr(strategy, "compile", False))

