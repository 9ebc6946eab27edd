"""Models: a registry of builders (``cnn``, ``mlp``, ``resnet18``, ``gpt``) and ``build_model``.

Importing this package registers every built-in model. See ``registry`` for the contract every
model follows (``forward``, ``block_classes``, ``init_weights``).
"""

from dist_train.models.registry import (
    build_model,
    check_model_compatible,
    count_parameters,
    model_names,
    register_model,
)

# Imported for their @register_model side effect (order = registration order only).
from dist_train.models import cnn, gpt, mlp  # noqa: E402,F401  isort: skip


@register_model("resnet18", tasks=("classification",))
def _build_resnet18(cfg, info):
    """``resnet18`` (``models/resnet.py``), imported when first built: importing torchvision costs
    about 2 s of CPU per process, which a job training another model should not pay."""
    from dist_train.models.resnet import build_resnet18

    return build_resnet18(cfg, info)


__all__ = [
    "build_model",
    "check_model_compatible",
    "count_parameters",
    "model_names",
    "register_model",
]
