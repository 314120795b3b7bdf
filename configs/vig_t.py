"""ViG-T.

Command (ImageNet-1k as an image folder holding train/ and val/; global batch 1024 over all
devices and hosts, i.e. the official 8 GPUs x 128):

    python -m train.main --config configs/vig_t.py --workdir runs/vig_t \
        --config.data.root=/path/to/imagenet

Hyper-parameters (vig-reference.md sections 5.1 and 10): BASE_LR 0.001 (peak LR
0.001 x 1024 / 512), warm-up LR 5e-7 and min LR 5e-6 scaled alike, weight decay 0.05 (none on
1-D parameters and biases), drop path 0, 300 epochs with 20 warm-up epochs (per-step
cosine), AdamW (0.9, 0.999, 1e-8), global-norm clip 5, EMA 0.9999, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5), label
smoothing 0.1. Trained in float32 like the official code (--config.model.dtype=bfloat16 for mixed
precision). Drop path 0.0: the official yaml's DROP_PATH_RATE line is commented out.

Target: 77.2 top-1 on ImageNet-1k val, 5.83M parameters.

Arguments (configs/default.py): ``:quick`` (bundled mini CIFAR-10 at 32 px, minutes on a CPU),
``:cifar`` (the full CIFAR-10 image folder at 32 px; patch_size 4, i.e. 8 x 8 tokens),
``:fake`` (random images), comma-separated, e.g. ``configs/vig_t.py:cifar,fake``.
"""

from configs import default


def get_config(arg=None):
    """ViG-T config; ``arg``: see the module docstring."""
    return default.variant(
        arg,
        name="vig_t",
        lr=0.001,
        drop_path_rate=0.0,
        weight_decay=0.05,
        dtype="float32",
        warmup_epochs=20.0,
    )
