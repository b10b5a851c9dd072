"""Model registry in timm's manner: ``@register_model`` entrypoints named ``<method>_<backbone>_<bits>``, ``create_model``, ``list_models``."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass

from .backbones import Pretrained
from .hash_model import HashModel

ModelEntrypoint = Callable[..., HashModel]

_ENTRYPOINTS: dict[str, ModelEntrypoint] = {}


@dataclass(frozen=True)
class ModelName:
    """The configuration a registered name carries."""

    method: str  # e.g. "csq"
    backbone: str  # e.g. "resnet50"
    bits: int  # code length, e.g. 64

    @classmethod
    def parse(cls, name: str) -> ModelName:
        parts = name.split("_")
        if len(parts) != 3 or not parts[2].isdigit():
            raise ValueError(f"model name {name!r} is not <method>_<backbone>_<bits>, e.g. csq_resnet50_64")
        return cls(parts[0], parts[1], int(parts[2]))


def register_model(fn: ModelEntrypoint) -> ModelEntrypoint:
    """Decorator: register ``fn`` under its ``__name__``, which must read <method>_<backbone>_<bits>."""
    ModelName.parse(fn.__name__)
    if fn.__name__ in _ENTRYPOINTS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _ENTRYPOINTS[fn.__name__] = fn
    return fn


def _entrypoints() -> dict[str, ModelEntrypoint]:
    from . import zoo  # noqa: F401 — importing the zoo registers every variant (no weights load)

    return _ENTRYPOINTS


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, sorted; ``pattern`` is a shell wildcard such as ``"csq_*_64"``."""
    names = sorted(_entrypoints())
    return fnmatch.filter(names, pattern) if pattern else names


def model_description(name: str) -> str:
    """The one-line description of a registered model, without building it."""
    return _entrypoint(name).__doc__ or ""


def _entrypoint(name: str) -> ModelEntrypoint:
    entrypoints = _entrypoints()
    if name not in entrypoints:
        close = fnmatch.filter(sorted(entrypoints), f"{name.split('_')[0]}_*")[:8]
        raise ValueError(f"unknown model {name!r}; similar: {close or 'none'}; see list_models()")
    return entrypoints[name]


def create_model(name: str, pretrained: Pretrained = False, bits: int | None = None, **kwargs) -> HashModel:
    """Build the registered model ``name``.

    pretrained: backbone weights — False (random), True (ImageNet weights from the library or the
        bundled package; fails offline with a message naming the path option), or a local file path.
    bits: with a name lacking the bits suffix (``"csq_resnet50"``), picks the code length; with a
        full name it must agree with the suffix.
    kwargs: ``img_size`` (input side, default per backbone), ``num_classes`` (classifier-aided
        heads, default 10), ``seed`` (lsh projection, default 0), ``head`` (head family,
        ``heads.HEAD_FAMILIES``: "linear" or "mlp" for pooled-feature methods, default the method's
        first), ``checkpoint`` (path of a whole trained HashModel state dict, loaded after building).
    """
    if bits is not None:
        if name.count("_") == 1:
            name = f"{name}_{bits}"
        elif ModelName.parse(name).bits != bits:
            raise ValueError(f"model {name!r} has {ModelName.parse(name).bits} bits, but bits={bits} was given")
    return _entrypoint(name)(pretrained=pretrained, **kwargs)
