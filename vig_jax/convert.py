"""Official PyTorch ViG / ViG-H checkpoints -> our Flax NNX parameters, and a CLI.

The conversion is a table from each official state_dict key to one of our parameter paths and a
layout rule (:func:`key_table`):

=========  ==========================================  =====================================
rule       PyTorch tensor                              ours
=========  ==========================================  =====================================
linear     ``nn.Linear.weight`` [out, in]              ``nnx.Linear.kernel`` [in, out] (.T)
linear2d   ``Linear2d.weight`` [out, in] or            ``nnx.Linear.kernel`` [in, out]
           [out, in, 1, 1] (ViG-H's 1x1 "linears")
conv       ``nn.Conv2d.weight`` [out, in/g, kh, kw]    ``nnx.Conv.kernel`` [kh, kw, in/g, out]
copy       biases, norm weights, ``pos_embed``         same shape (norm ``weight`` -> ``scale``)
=========  ==========================================  =====================================

Names: ours follow the official ones (``blocks.3.attn.qkv_proj.weight`` ->
``blocks/3/attn/qkv_proj/kernel``) except the stems, whose ``nn.Sequential`` indices become
``conv1, norm1, conv2, norm2`` (``patch_embed.proj.{0,1,3,4}`` in ViG, ``patch_embed.{0,2,5,7}``
in ViG-H), ViG-H's ``layers.i.downsample.{1,3}`` -> ``downsample.conv/norm``, and the
depthwise ``in_proj.0`` -> ``in_proj``. q, k, v stay fused in ``qkv_proj`` (columns
``[q | k | v]``) and the gates in ``gk_proj[1]`` (``[forward | backward]``), as official.

Strict: a missing, unexpected or mis-shaped key raises :class:`CheckpointMismatchError` (a
ValueError) naming every offending key, with both shapes.

Which weights: ``torch.save`` files of the official training code hold ``model`` and, with EMA
on (the default), ``model_ema``; "best" checkpoints hold only ``model`` (for
``best_acc_ema_ckpt.pth`` that ``model`` IS the EMA). The default is ``model`` (or a bare
state_dict); ``use_ema=True`` / ``--ema`` picks ``model_ema``.

CLI::

    python -m vig_jax.convert ViG-T.pth out_dir --model vig_t [--ema] [--key KEY]

writes ``out_dir/params`` (an Orbax ``StandardCheckpointer`` checkpoint of
``nnx.state(model, nnx.Param)``) and ``out_dir/model.json`` (model name and constructor
arguments); :func:`load_converted` restores it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vig_jax import create_model
from vig_jax.pth import load_pth
from vig_jax.vig import VIG_CONFIGS
from vig_jax.vig_h import VIG_H_CONFIGS

Path = tuple[str | int, ...]
Rule = tuple[Path, str]  # (our parameter path, layout rule)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped keys."""


# ----------------------------------------------------------------------------- layout rules
def _linear_to_ours(w: np.ndarray) -> np.ndarray:
    return w.T


def _linear2d_to_ours(w: np.ndarray) -> np.ndarray:
    return (w[:, :, 0, 0] if w.ndim == 4 else w).T


def _conv_to_ours(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)


def _copy(w: np.ndarray) -> np.ndarray:
    return w


def _official_shapes(rule: str, ours: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The official tensor shapes that map onto a parameter of shape ``ours``."""
    if rule == "linear":
        return [ours[::-1]]
    if rule == "linear2d":
        return [ours[::-1], ours[::-1] + (1, 1)]
    if rule == "conv":
        return [(ours[3], ours[2], ours[0], ours[1])]
    return [ours]


RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": _linear_to_ours,
    "linear2d": _linear2d_to_ours,
    "conv": _conv_to_ours,
    "copy": _copy,
}


# ----------------------------------------------------------------------------- key tables
def _linear(table: dict, official: str, ours: Path, bias: bool, rule: str = "linear") -> None:
    table[f"{official}.weight"] = (ours + ("kernel",), rule)
    if bias:
        table[f"{official}.bias"] = (ours + ("bias",), "copy")


def _conv(table: dict, official: str, ours: Path, bias: bool = True) -> None:
    table[f"{official}.weight"] = (ours + ("kernel",), "conv")
    if bias:
        table[f"{official}.bias"] = (ours + ("bias",), "copy")


def _norm(table: dict, official: str, ours: Path, bias: bool) -> None:
    table[f"{official}.weight"] = (ours + ("scale",), "copy")
    if bias:
        table[f"{official}.bias"] = (ours + ("bias",), "copy")


def _mixer(table: dict, official: str, ours: Path, proj_rule: str) -> None:
    """BiGLA: ``GatedLinearAttention`` (ViG, nn.Linear) or ``GLA2D`` (ViG-H, Linear2d)."""
    _conv(table, f"{official}.in_proj.0", ours + ("in_proj",), bias=False)
    _linear(table, f"{official}.qkv_proj", ours + ("qkv_proj",), False, proj_rule)
    _linear(table, f"{official}.gk_proj.0", ours + ("gk_proj", 0), False, proj_rule)
    _linear(table, f"{official}.gk_proj.1", ours + ("gk_proj", 1), True, proj_rule)
    _linear(table, f"{official}.g_proj", ours + ("g_proj",), True, proj_rule)
    _linear(table, f"{official}.o_proj", ours + ("o_proj",), False)  # nn.Linear in both
    _norm(table, f"{official}.g_norm", ours + ("g_norm",), bias=False)
    _norm(table, f"{official}.l_norm", ours + ("l_norm",), bias=False)


def _stem(table: dict, official: tuple[str, str, str, str]) -> None:
    conv1, norm1, conv2, norm2 = official
    _conv(table, conv1, ("patch_embed", "conv1"))
    _norm(table, norm1, ("patch_embed", "norm1"), bias=True)
    _conv(table, conv2, ("patch_embed", "conv2"))
    _norm(table, norm2, ("patch_embed", "norm2"), bias=True)


def vig_key_table(depth: int, num_classes: int) -> dict[str, Rule]:
    """Official plain-ViG key -> (our path, rule)."""
    table: dict[str, Rule] = {"pos_embed": (("pos_embed",), "copy")}
    _stem(table, tuple(f"patch_embed.proj.{i}" for i in (0, 1, 3, 4)))
    for i in range(depth):
        p, q = f"blocks.{i}", ("blocks", i)
        _norm(table, f"{p}.attn_norm", q + ("attn_norm",), bias=False)
        _mixer(table, f"{p}.attn", q + ("attn",), "linear")
        _norm(table, f"{p}.mlp_norm", q + ("mlp_norm",), bias=False)
        _linear(table, f"{p}.mlp.gate_proj", q + ("mlp", "gate_proj"), False)
        _linear(table, f"{p}.mlp.down_proj", q + ("mlp", "down_proj"), False)
    _norm(table, "norm", ("norm",), bias=False)
    if num_classes:
        _linear(table, "head", ("head",), True)
    return table


def vig_h_key_table(depths: tuple[int, ...], num_classes: int) -> dict[str, Rule]:
    """Official ViG-H key -> (our path, rule)."""
    table: dict[str, Rule] = {}
    _stem(table, tuple(f"patch_embed.{i}" for i in (0, 2, 5, 7)))
    for i, depth in enumerate(depths):
        for j in range(depth):
            p, q = f"layers.{i}.blocks.{j}", ("layers", i, "blocks", j)
            _norm(table, f"{p}.norm", q + ("norm",), bias=True)
            _mixer(table, f"{p}.op", q + ("op",), "linear2d")
            _norm(table, f"{p}.norm2", q + ("norm2",), bias=True)
            _linear(table, f"{p}.mlp.fc1", q + ("mlp", "fc1"), False, "linear2d")
            _linear(table, f"{p}.mlp.fc2", q + ("mlp", "fc2"), False, "linear2d")
        if i + 1 < len(depths):
            _conv(table, f"layers.{i}.downsample.1", ("layers", i, "downsample", "conv"))
            _norm(table, f"layers.{i}.downsample.3", ("layers", i, "downsample", "norm"), True)
    _norm(table, "classifier.norm", ("classifier", "norm"), bias=True)
    if num_classes:
        _linear(table, "classifier.head", ("classifier", "head"), True)
    return table


def key_table(name: str, num_classes: int = 1000) -> dict[str, Rule]:
    """Official state_dict key -> (our parameter path, layout rule) for model ``name``."""
    if name in VIG_CONFIGS:
        return vig_key_table(VIG_CONFIGS[name].depth, num_classes)
    if name in VIG_H_CONFIGS:
        return vig_h_key_table(VIG_H_CONFIGS[name].depths, num_classes)
    raise ValueError(
        f"no checkpoint conversion for model {name!r}; expected one of "
        f"{sorted(VIG_CONFIGS) + sorted(VIG_H_CONFIGS)}"
    )


# ----------------------------------------------------------------------------- conversion
def _head_key(name: str) -> str:
    return "head.weight" if name in VIG_CONFIGS else "classifier.head.weight"


def infer_model_kwargs(
    state_dict: Mapping[str, Any], name: str, patch_size: int | None = None
) -> dict[str, int]:
    """``num_classes`` (from the head; 0 without one) and, for ViG, ``img_size`` (from the
    position-embedding grid: sqrt(N) * patch_size)."""
    head = state_dict.get(_head_key(name))
    kwargs = {"num_classes": int(np.shape(head)[0]) if head is not None else 0}
    if name in VIG_CONFIGS and "pos_embed" in state_dict:
        n = int(np.shape(state_dict["pos_embed"])[1])
        grid = math.isqrt(n)
        if grid * grid != n:
            shape = np.shape(state_dict["pos_embed"])
            raise CheckpointMismatchError(
                f"pos_embed: {n} tokens is not a square grid; shape {shape}"
            )
        kwargs["img_size"] = grid * (patch_size or VIG_CONFIGS[name].patch_size)
    return kwargs


def convert_state_dict(
    state_dict: Mapping[str, Any],
    name: str,
    *,
    num_classes: int | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    param_dtype: Any = jnp.float32,
) -> nnx.State:
    """Converts an official PyTorch state_dict into our model's parameter state.

    Args:
      state_dict: official key -> array (NumPy or anything ``np.asarray`` takes), e.g. the
        ``model`` entry of :func:`vig_jax.pth.load_pth`.
      name: model name (``"vig_t"`` ... ``"vig_h_b"``).
      num_classes, img_size: the model's; None infers them from the head and the
        ``pos_embed`` grid (:func:`infer_model_kwargs`).
      patch_size: the model's stem patch size; None = official.
      param_dtype: dtype of the returned parameters.

    Returns:
      ``nnx.State`` with the structure of ``nnx.state(model, nnx.Param)`` for
      ``create_model(name, num_classes=..., img_size=..., patch_size=...)``; apply it with
      ``nnx.update(model, state)``.

    Raises:
      CheckpointMismatchError: listing every missing, unexpected and mis-shaped key.
    """
    inferred = infer_model_kwargs(state_dict, name, patch_size)
    num_classes = inferred["num_classes"] if num_classes is None else num_classes
    if img_size is None:
        img_size = inferred.get("img_size", 224)
    table = key_table(name, num_classes)
    abstract = nnx.eval_shape(
        lambda: create_model(
            name,
            num_classes=num_classes,
            img_size=img_size,
            patch_size=patch_size,
            param_dtype=param_dtype,
        )
    )
    targets = {path: var for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    table_paths = {path for path, _ in table.values()}
    if table_paths != set(targets):  # the table and the model must describe the same tensors
        raise AssertionError(
            f"conversion table out of sync with {name}: "
            f"{sorted(map(str, table_paths ^ set(targets)))[:10]}"
        )

    problems = [f"missing from the checkpoint: {k}" for k in table if k not in state_dict]
    problems += [f"unexpected in the checkpoint: {k}" for k in state_dict if k not in table]
    converted = {}
    for key, (path, rule) in table.items():
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        ours = tuple(targets[path].shape)
        allowed = _official_shapes(rule, ours)
        if value.shape not in allowed:
            problems.append(
                f"shape mismatch for {key}: checkpoint {value.shape}, model expects "
                f"{' or '.join(map(str, allowed))} (PyTorch layout; ours {ours} at "
                f"{'/'.join(map(str, path))})"
            )
            continue
        converted[path] = nnx.Param(jnp.asarray(RULES[rule](value), dtype=param_dtype))
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not fit {name} (num_classes={num_classes}, img_size={img_size}, "
            f"patch_size={patch_size}): {len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    return nnx.from_flat_state(converted)


def select_state_dict(
    checkpoint: Any, *, key: str | None = None, use_ema: bool = False
) -> Mapping[str, Any]:
    """Picks the state_dict out of a loaded ``.pth``.

    Args:
      checkpoint: what :func:`vig_jax.pth.load_pth` returned.
      key: take ``checkpoint[key]``.
      use_ema: take ``checkpoint["model_ema"]`` (the official EMA weights).

    Returns:
      ``checkpoint[key]``; by default ``checkpoint["model"]``, else ``checkpoint["state_dict"]``,
      else the checkpoint itself if it is a bare state_dict (all values arrays).
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint is a {type(checkpoint).__name__}; expected a dict")
    if use_ema and key not in (None, "model_ema"):
        raise ValueError(f"use_ema=True and key={key!r} conflict; pass one of them")
    wanted = "model_ema" if use_ema else key
    if wanted is None:
        for candidate in ("model", "state_dict"):
            if candidate in checkpoint:
                wanted = candidate
                break
    if wanted is None:
        if checkpoint and all(isinstance(v, np.ndarray) for v in checkpoint.values()):
            return checkpoint
        raise ValueError(
            f"no state_dict found: expected a 'model' / 'state_dict' entry or a bare state_dict; "
            f"top-level keys: {sorted(map(str, checkpoint))}"
        )
    if wanted not in checkpoint:
        raise ValueError(
            f"checkpoint has no {wanted!r} entry; top-level keys: {sorted(map(str, checkpoint))}"
        )
    return checkpoint[wanted]


def load_official_checkpoint(
    path: str | os.PathLike,
    name: str,
    *,
    key: str | None = None,
    use_ema: bool = False,
    **create_model_kwargs: Any,
) -> nnx.Module:
    """Builds model ``name`` with the weights of an official ``.pth`` checkpoint.

    Args:
      path: ``torch.save`` file (read without PyTorch, see :mod:`vig_jax.pth`).
      name: model name, e.g. ``"vig_s"``.
      key, use_ema: which state_dict, see :func:`select_state_dict`.
      **create_model_kwargs: for :func:`vig_jax.create_model` (``dtype``, ``implementation``,
        ...); ``num_classes`` and ``img_size`` default to the checkpoint's.

    Returns:
      The model in eval mode (``model.train()`` re-enables drop path).
    """
    state_dict = select_state_dict(load_pth(path), key=key, use_ema=use_ema)
    kwargs = dict(create_model_kwargs)
    for k, v in infer_model_kwargs(state_dict, name, kwargs.get("patch_size")).items():
        kwargs.setdefault(k, v)
    state = convert_state_dict(
        state_dict,
        name,
        num_classes=kwargs["num_classes"],
        img_size=kwargs.get("img_size"),
        patch_size=kwargs.get("patch_size"),
        param_dtype=kwargs.get("param_dtype", jnp.float32),
    )
    model = create_model(name, **kwargs)
    nnx.update(model, state)
    model.eval()
    return model


# ----------------------------------------------------------------------------- saved form
PARAMS_DIR = "params"
META_FILE = "model.json"


def save_converted(model: nnx.Module, out_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Writes ``out_dir/params`` (Orbax) and ``out_dir/model.json`` (``meta``)."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(
            os.path.join(out_dir, PARAMS_DIR), nnx.state(model, nnx.Param), force=True
        )
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(dict(meta), f, indent=2, sort_keys=True)


def load_converted(out_dir: str | os.PathLike, **create_model_kwargs: Any) -> nnx.Module:
    """Restores a model written by the CLI (or :func:`save_converted`), in eval mode.

    Args:
      out_dir: the CLI's output directory.
      **create_model_kwargs: override the saved constructor arguments (e.g. ``dtype``).
    """
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(os.fspath(out_dir))
    with open(os.path.join(out_dir, META_FILE)) as f:
        meta = json.load(f)
    kwargs = {**meta["create_model_kwargs"], **create_model_kwargs}
    model = create_model(meta["model"], **kwargs)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.state(model, nnx.Param)
    )
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.join(out_dir, PARAMS_DIR), abstract)
    nnx.update(model, params)
    model.eval()
    return model


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    """``python -m vig_jax.convert in.pth out_dir --model NAME``."""
    parser = argparse.ArgumentParser(
        prog="python -m vig_jax.convert",
        description="Convert an official hustvl/ViG PyTorch checkpoint (.pth) to an Orbax "
        "checkpoint of vig_jax parameters (out_dir/params + out_dir/model.json).",
    )
    parser.add_argument("checkpoint", help="torch.save file (.pth), read without PyTorch")
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument(
        "--model", required=True, help="vig_t, vig_s, vig_b, vig_h_t, vig_h_s, vig_h_b"
    )
    parser.add_argument("--ema", action="store_true", help="convert the 'model_ema' weights")
    parser.add_argument("--key", default=None, help="take this top-level entry of the checkpoint")
    parser.add_argument(
        "--patch-size", type=int, default=None, help="stem patch size if not official"
    )
    args = parser.parse_args(argv)

    kwargs = {} if args.patch_size is None else {"patch_size": args.patch_size}
    model = load_official_checkpoint(
        args.checkpoint, args.model, key=args.key, use_ema=args.ema, **kwargs
    )
    create_kwargs = {"num_classes": model.num_classes, "img_size": model.img_size}
    create_kwargs["patch_size"] = model.patch_size
    meta = {
        "model": args.model,
        "create_model_kwargs": create_kwargs,
        "source": os.path.abspath(args.checkpoint),
        "entry": "model_ema" if args.ema else (args.key or "default"),
    }
    save_converted(model, args.out_dir, meta)
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"converted {args.model} ({count:,} parameters) -> {os.path.abspath(args.out_dir)}")


if __name__ == "__main__":
    main()
