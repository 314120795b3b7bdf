"""Model registry: ``create_model(name, ...)``, ``list_models()`` and ``@register_model``.

A registered factory is called with keyword arguments only::

    factory(num_classes=..., img_size=..., dtype=..., param_dtype=..., implementation=...,
            drop_path_rate=..., patch_size=..., rngs=..., **extra)

and returns an ``nnx.Module`` whose ``__call__`` maps NHWC images ``[B, H, W, 3]`` to logits
``[B, num_classes]``. ``None`` means "the variant's official value" for ``drop_path_rate`` and
``patch_size``; a factory may ignore arguments that do not apply to it (e.g. a DeiT ignores
``implementation``), but must accept them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax.numpy as jnp
from flax import nnx

Factory = Callable[..., nnx.Module]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering ``factory`` under ``name`` (an error if the name is taken).

    Example::

        @register_model("deit_t")
        def deit_t(*, num_classes, img_size, dtype, param_dtype, rngs, **unused):
            return DeiT(...)
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string; got {name!r}")

    def decorator(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = factory
        return factory

    return decorator


def register_variants(model_cls: Callable[..., nnx.Module], configs: dict[str, Any]) -> None:
    """Registers one factory per ``configs`` entry, each building ``model_cls(config, ...)``.

    ``model_cls`` takes the variant's config first and the registry's keyword arguments
    (see the module docstring) after it.
    """
    for name, config in configs.items():
        register_model(name)(_variant_factory(name, model_cls, config))


def _variant_factory(name: str, model_cls: Callable[..., nnx.Module], config: Any) -> Factory:
    def factory(
        *,
        num_classes: int = 1000,
        img_size: int = 224,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        drop_path_rate: float | None = None,
        patch_size: int | None = None,
        rngs: nnx.Rngs,
        **model_kwargs: Any,
    ) -> nnx.Module:
        return model_cls(
            config,
            num_classes=num_classes,
            img_size=img_size,
            patch_size=patch_size,
            drop_path_rate=drop_path_rate,
            implementation=implementation,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            **model_kwargs,
        )

    factory.__name__ = name
    factory.__doc__ = f"Builds {name} ({config})."
    return factory


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    num_classes: int = 1000,
    img_size: int = 224,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    implementation: str | None = None,
    drop_path_rate: float | None = None,
    patch_size: int | None = None,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> nnx.Module:
    """Builds the registered model ``name``.

    Args:
      name: one of :func:`list_models` (e.g. ``"vig_t"``, ``"vig_h_s"``).
      num_classes: classifier outputs; 0 gives a model without head (pooled features).
      img_size: training resolution; ViG stores its position embedding on the
        ``img_size // patch_size`` grid and resizes it for other inputs.
      dtype: compute dtype (e.g. ``jnp.bfloat16`` for mixed precision).
      param_dtype: parameter storage dtype.
      implementation: BiGLA op implementation passed to ``pallas_kernels.bigla`` (None: the
        fastest available).
      drop_path_rate: stochastic depth of the last block; None = the official per-variant rate.
      patch_size: stem patch size; None = official (16 for ViG, 4 for ViG-H).
      rngs: ``nnx.Rngs`` for the parameters and the ``"dropout"`` stream; default
        ``nnx.Rngs(0)``.
      **kwargs: passed on to the factory and from there to the model class, e.g.
        ``conv_implementation`` of ViG and ViG-H (``"pallas"``, the default on a GPU,
        ``"shifted"``, the default elsewhere, ``"cudnn"`` or ``"hybrid"``: :mod:`vig_jax.dwconv`)
        and ``output_implementation`` (``"pallas"``, the default on a GPU, or ``"xla"``:
        :class:`vig_jax.bigla.BiGLA`).

    Returns:
      The model, in NNX's default (training) mode; call ``model.eval()`` for inference.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return _REGISTRY[name](
        num_classes=num_classes,
        img_size=img_size,
        dtype=dtype,
        param_dtype=param_dtype,
        implementation=implementation,
        drop_path_rate=drop_path_rate,
        patch_size=patch_size,
        rngs=nnx.Rngs(0) if rngs is None else rngs,
        **kwargs,
    )
