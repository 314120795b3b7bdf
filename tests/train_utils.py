"""Helpers for the trainer tests: a tiny registered model, tiny configs, a tiny image folder,
and a command-line driver so tests can run training in a subprocess (for 8 fake devices,
SIGKILL and SIGTERM)::

    python tests/train_utils.py train WORKDIR DATA_ROOT '{"total_steps": 50}'
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_MODEL = "deit_tiny_test"
CLASSES = ("a", "b", "c", "d")


def register_tiny_model() -> None:
    """Registers DeiT's 2-block, 32-wide test variant as ``deit_tiny_test`` (idempotent)."""
    from vig_jax import deit, list_models, register_model

    if TINY_MODEL in list_models():
        return

    @register_model(TINY_MODEL)
    def _tiny(**kwargs):
        return deit.create_deit("deit_mu", **kwargs)


def make_image_folder(root: Path, per_class: int = 6, size: int = 8) -> Path:
    """Writes ``root/{train,test}/<class>/*.png`` of random images; returns root."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", max(per_class // 2, 1))):
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + 60 * label
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def tiny_config(data_root: str | Path | None = None, **overrides):
    """The full recipe on the tiny model: 8 px images, patch 4, batch 8, all augmentations."""
    from configs import default

    c = default.get_config()
    c.model.name = TINY_MODEL
    c.model.patch_size = 4
    c.model.drop_path_rate = 0.1
    c.data.img_size = 8
    c.data.num_classes = len(CLASSES)
    c.data.eval_split = "test"
    c.data.num_workers = 0
    c.data.read_threads = 1
    if data_root is None:
        c.data.source = "fake"
        c.data.fake_num_examples = 64
    else:
        c.data.source = "image_folder"
        c.data.root = str(data_root)
    c.aug.rand_augment = "rand-m9-mstd0.5-inc1"
    c.batch_size = 8
    c.total_steps = 6
    c.warmup_steps = 2
    c.ema_decay = 0.9
    c.log_every_steps = 2
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.tensorboard = False
    c.progress_bar = False
    c.fsdp_min_size = 0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def compare_meshes() -> dict:
    """One train step and one eval step on a 1-device mesh and on all devices (replicated and
    FSDP), same global batch; returns the largest differences (printed as JSON by ``main``)."""
    import jax

    from train import sharding, trainer

    register_tiny_model()
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
        "label": rng.integers(0, len(CLASSES), (16,), dtype=np.int32),
    }
    results = {}
    for name, devices, mode in (
        ("one", jax.devices()[:1], "replicated"),
        ("all", jax.devices(), "replicated"),
        ("fsdp", jax.devices(), "fsdp"),
    ):
        # Warm-up off and a large LR so that the two steps move the parameters by ~1e-2.
        config = tiny_config(
            param_sharding=mode, batch_size=16, warmup_steps=0, **{"optim.lr": 0.5}
        )
        mesh = sharding.make_mesh(devices)
        comps = trainer.build_components(config, mesh, len(CLASSES), 10, 2)
        state, rngs = comps.init()
        init_params = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        global_batch = sharding.host_to_global(batch, mesh)
        for _ in range(2):
            state, metrics = comps.train_step(state, rngs, global_batch)
        eval_batch = dict(global_batch, mask=global_batch["label"] >= 0)
        evals = comps.eval_step(state.params, state.model_state, rngs, eval_batch)
        sharded = [str(x.sharding.spec) for x in jax.tree.leaves(state.params) if x.sharding.spec]
        results[name] = dict(
            loss=float(metrics["train/loss"]),
            grad_norm=float(metrics["train/grad_norm"]),
            params=[np.asarray(x) for x in jax.tree.leaves(state.params)],
            ema=[np.asarray(x) for x in jax.tree.leaves(state.ema_params)],
            eval_loss=float(evals["loss"]),
            num_devices=len(devices),
            sharded_params=len(sharded),
            update=max(
                float(np.max(np.abs(np.asarray(a) - b)))
                for a, b in zip(jax.tree.leaves(state.params), init_params, strict=True)
            ),
        )
    one = results["one"]
    out = {}
    for name in ("all", "fsdp"):
        r = results[name]
        out[name] = dict(
            num_devices=r["num_devices"],
            sharded_params=r["sharded_params"],
            loss_diff=abs(r["loss"] - one["loss"]),
            grad_norm_diff=abs(r["grad_norm"] - one["grad_norm"]),
            eval_loss_diff=abs(r["eval_loss"] - one["eval_loss"]),
            param_max_diff=max(
                float(np.max(np.abs(a - b)))
                for a, b in zip(r["params"], one["params"], strict=True)
            ),
            ema_max_diff=max(
                float(np.max(np.abs(a - b))) for a, b in zip(r["ema"], one["ema"], strict=True)
            ),
        )
    out["loss"] = one["loss"]
    out["max_update"] = one["update"]
    return out


def main(argv: list[str]) -> None:
    """``train WORKDIR DATA_ROOT OVERRIDES_JSON``: runs train_and_evaluate like train.main;
    ``meshes``: prints :func:`compare_meshes` as JSON."""
    from absl import flags, logging

    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.INFO)
    command = argv[1]
    if command == "meshes":
        print("RESULT " + json.dumps(compare_meshes()))
        return
    if command != "train":
        raise SystemExit(f"unknown command {command!r}")
    # A test that gives up on this process sends SIGUSR1 first: every thread's stack in the log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    workdir, data_root, overrides = argv[2:5]
    register_tiny_model()
    from train import trainer

    config = tiny_config(data_root or None, **json.loads(overrides))
    summary = trainer.train_and_evaluate(config, workdir)
    sys.exit(143 if summary.get("preempted") else 0)


if __name__ == "__main__":
    main(sys.argv)
