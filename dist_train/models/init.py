"""``model.init``: a weight-init scheme for every Linear and Conv layer, after the model's own init.

``build_model`` attaches the scheme to the model's ``init_weights()``, so every path that
initialises a model runs it: a plain build, and FSDP's meta-device build, which re-runs
``init_weights()`` on the shards under a TorchFunctionMode (``strategy/fsdp.py``) that draws each
fill on a full-size CPU tensor. The weights are then identical under every strategy.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

# name -> (the torch.nn.init function, its keyword arguments)
SCHEMES: Dict[str, Tuple[Callable[..., torch.Tensor], Dict[str, Any]]] = {
    "xavier_uniform": (nn.init.xavier_uniform_, {}),
    "xavier_normal": (nn.init.xavier_normal_, {}),
    # PyTorch's own layers use leaky_relu(sqrt(5)); a user who names He init means the ReLU gain.
    "kaiming_uniform": (nn.init.kaiming_uniform_, {"nonlinearity": "relu"}),
    "kaiming_normal": (nn.init.kaiming_normal_, {"nonlinearity": "relu"}),
    "orthogonal": (nn.init.orthogonal_, {}),
}
# Conv1d/2d/3d and their transposed forms share _ConvNd.
LAYERS = (nn.Linear, nn.modules.conv._ConvNd)


def _fill(fn: Callable[..., torch.Tensor], tensor: torch.Tensor, **kwargs: Any) -> None:
    """``fn(tensor, **kwargs)``, dispatched so that an active TorchFunctionMode sees the whole call.

    torch.nn.init's kaiming_* functions dispatch themselves this way; xavier_* and orthogonal_
    do not, and orthogonal_'s QR cannot run on a shard. Dispatching the public torch.nn.init
    function lets FSDP's _FullInit run it on the full CPU tensor and keep this rank's shard.
    """
    if torch.overrides.has_torch_function_variadic(tensor):
        torch.overrides.handle_torch_function(fn, (tensor,), tensor, **kwargs)
    else:
        fn(tensor, **kwargs)


@torch.no_grad()
def apply_init(model: nn.Module, scheme: str) -> None:
    """Re-initialise every Linear and Conv weight of ``model`` with ``scheme``, zero their biases.

    In module order, so the draws are the same wherever it runs. A no-op for ``default`` and on
    the meta device (nothing to fill: FSDP fills the shards later by running it again).
    """
    if scheme == "default":
        return
    if scheme not in SCHEMES:
        raise ValueError(f"model.init={scheme!r} is not one of default, {', '.join(SCHEMES)}")
    fn, kwargs = SCHEMES[scheme]
    for module in model.modules():
        if not isinstance(module, LAYERS) or module.weight.is_meta:
            continue
        _fill(fn, module.weight, **kwargs)
        if module.bias is not None:
            _fill(nn.init.zeros_, module.bias)


def attach_init(model: nn.Module, scheme: str) -> nn.Module:
    """Make ``model.init_weights()`` run the model's own init, then ``scheme``; returns ``model``.

    Set on the instance, so FSDP (which swaps the model's class) and any later re-init see it.
    """
    if scheme == "default":
        return model
    own_init = model.init_weights

    def init_weights() -> None:
        own_init()
        apply_init(model, scheme)

    init_weights.__doc__ = f"The model's own init, then model.init={scheme} for Linear and Conv layers."
    model.init_weights = init_weights  # type: ignore[method-assign]
    return model
