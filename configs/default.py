"""Defaults shared by every config: the official ViG recipe on ImageNet-1k.

vig-reference.md section 10 (official config.py, yaml files, main.py, data/build.py, utils/):
300 epochs with 20 warm-up epochs (per-step linear warm-up from WARMUP_LR, then cosine to
MIN_LR, timm ``warmup_prefix``), AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 with no decay
for 1-D parameters and biases, learning rates scaled by global batch / 512, global-norm clip
5.0, EMA 0.9999, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0
(switch 0.5) with label smoothing 0.1, global batch 1024 (8 GPUs x 128). Variant files set the
model, base LR, weight decay and drop path.

``get_config(arg)`` arguments (comma-separated, e.g. ``configs/vig_t.py:cifar,quick``):

* ``quick``: the bundled mini CIFAR-10 (train/data/cifar10_mini, 32 px), a short run sized
  for a 2-core CPU (minutes), no mixup/cutmix, a faster EMA.
* ``cifar``: the full CIFAR-10 image folder (``--config.data.root`` = the folder holding
  ``train/`` and ``test/``, extracted from ../shared/data/cifar10/*.tar.gz), 32 px.
* ``fake``: random images (pipeline and throughput checks).
"""

import ml_collections
from ml_collections import config_dict


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The recipe with ViG-T's model settings; variant files override the model part."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "vig_t"
    c.model.dtype = "float32"  # Compute dtype; "bfloat16" for mixed precision.
    c.model.param_dtype = "float32"
    c.model.implementation = config_dict.placeholder(str)  # None: fastest for the backend.
    # ViG / ViG-H depthwise conv: None = the backend's default ("pallas" on a GPU, else
    # "shifted"), or "cudnn", "hybrid" (vig_jax/dwconv.py).
    c.model.conv_implementation = config_dict.placeholder(str)
    # ViG / ViG-H gated output: None = the backend's default ("pallas" on a GPU, else "xla")
    # (vig_jax/bigla.py).
    c.model.output_implementation = config_dict.placeholder(str)
    # ViG / ViG-H forget gates: None = the default ("xla" until the Pallas kernels are timed on
    # a GPU: vig_jax/bigla.py PALLAS_GATES_BY_DEFAULT), or "pallas" (pallas_kernels/gates.py).
    c.model.gate_implementation = config_dict.placeholder(str)
    # Plain ViG's RMSNorms (ViG-H has LayerNorms: leave unset): None = the default ("xla" until
    # the Pallas kernels are timed on a GPU: vig_jax/layers.py PALLAS_NORM_BY_DEFAULT), or
    # "pallas" (pallas_kernels/rms_norm.py).
    c.model.norm_implementation = config_dict.placeholder(str)
    c.model.drop_path_rate = 0.0
    c.model.patch_size = config_dict.placeholder(int)  # None: the variant's (16).

    c.data = ml_collections.ConfigDict()
    c.data.source = "image_folder"  # image_folder | bundled | tfds | fake
    c.data.root = ""  # Folder holding <train_split>/<class>/*.jpg and <eval_split>/...
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.tfds_name = "imagenet2012"
    c.data.tfds_data_dir = ""
    c.data.img_size = 224
    c.data.num_classes = 1000
    c.data.fake_num_examples = 10_000
    c.data.num_workers = 8  # Grain worker processes for training (0: in the main process).
    c.data.read_threads = 8  # Threads decoding / augmenting in each process.

    c.batch_size = 1024  # Global, over all devices and hosts.
    c.total_epochs = 300.0
    c.warmup_epochs = 20.0
    c.total_steps = -1  # > 0 overrides total_epochs.
    c.warmup_steps = -1  # >= 0 overrides warmup_epochs.

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3  # BASE_LR; the peak LR is lr * batch_size / lr_batch_denominator.
    c.optim.warmup_lr = 5e-7
    c.optim.min_lr = 5e-6
    c.optim.lr_batch_denominator = 512
    c.optim.weight_decay = 0.05
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_grad = 5.0
    c.ema_decay = 0.9999  # 0 disables the EMA.

    c.aug = ml_collections.ConfigDict()
    c.aug.rand_augment = "rand-m9-mstd0.5-inc1"  # "" disables.
    c.aug.mixup = 0.8
    c.aug.cutmix = 1.0
    c.aug.mixup_prob = 1.0
    c.aug.mixup_switch_prob = 0.5
    c.aug.label_smoothing = 0.1
    c.aug.random_erasing = 0.25

    c.log_every_steps = 100
    c.eval_every_steps = 0  # 0: once per epoch.
    c.checkpoint_every_steps = 0  # 0: once per epoch.
    c.max_checkpoints = 3  # Newest kept, besides the best.
    c.best_metric = "eval/top1"
    c.async_checkpointing = True

    c.param_sharding = "replicated"  # replicated | fsdp
    c.fsdp_min_size = 2**14
    c.distributed = "auto"  # auto | True | False: jax.distributed.initialize()

    c.tensorboard = True
    c.progress_bar = True
    return apply_args(c, arg)


def apply_args(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the comma-separated modifiers of the module docstring to ``c``."""
    known = {"quick", "cifar", "fake"}
    mods = [a.strip() for a in (arg or "").split(",") if a.strip()]
    unknown = set(mods) - known
    if unknown:
        raise ValueError(f"config arguments {sorted(unknown)}; expected some of {sorted(known)}")
    if "cifar" in mods or "quick" in mods:
        c.data.img_size = 32
        c.data.num_classes = 10
        c.data.eval_split = "test"
        c.model.patch_size = 4  # 8 x 8 tokens at 32 px (16 would leave 2 x 2).
    if "cifar" in mods:
        c.data.source = "image_folder"
        c.batch_size = 256
        c.total_epochs = 100.0
        c.warmup_epochs = 5.0
        c.ema_decay = 0.999  # ~20k steps in all: a 0.9999 EMA would lag most of the run.
        c.data.num_workers = 8
    if "fake" in mods:
        c.data.source = "fake"
    if "quick" in mods:
        # Sized for a 2-core CPU: ~3,200 images seen (0.64 epochs of the bundled 5,000), one
        # evaluation at the end. Short runs want a high LR and no heavy regularisation.
        c.data.source = "bundled"
        c.data.num_workers = 0
        c.data.read_threads = 2
        c.batch_size = 32
        c.total_steps = 120
        c.warmup_steps = 10
        c.optim.lr = 1.6e-2  # Peak LR 1e-3 at batch 32 (lr * batch / 512).
        c.optim.min_lr = 1.6e-3
        c.ema_decay = 0.0  # An EMA needs thousands of steps; off for the quick run.
        c.aug.mixup = 0.0
        c.aug.cutmix = 0.0
        c.aug.rand_augment = ""
        c.aug.random_erasing = 0.0
        c.model.drop_path_rate = 0.0
        c.log_every_steps = 10
        c.eval_every_steps = 100_000  # Only at the end.
        c.checkpoint_every_steps = 60
        c.max_checkpoints = 2
    return c


def variant(
    arg: str | None,
    *,
    name: str,
    lr: float,
    drop_path_rate: float,
    weight_decay: float = 0.05,
    dtype: str = "float32",
    warmup_epochs: float = 20.0,
) -> ml_collections.ConfigDict:
    """The recipe with one model's official settings, then the ``arg`` modifiers."""
    c = get_config()
    c.model.name = name
    c.model.dtype = dtype
    c.model.drop_path_rate = drop_path_rate
    c.optim.lr = lr
    c.optim.weight_decay = weight_decay
    c.warmup_epochs = warmup_epochs
    return apply_args(c, arg)
