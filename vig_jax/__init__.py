"""ViG and ViG-H (bidirectional gated linear attention vision models) in Flax NNX.

    from vig_jax import create_model, list_models
    model = create_model("vig_t")              # NHWC float images -> logits
    logits = model(images)                     # [B, 224, 224, 3] -> [B, 1000]

Official checkpoints: :func:`vig_jax.convert.load_official_checkpoint`.
"""

from vig_jax import deit, vig, vig_h  # noqa: F401  (registers the models)
from vig_jax.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
