"""DeiT-T (our JAX baseline, vig_jax/deit.py).

Command (ImageNet-1k as an image folder holding train/ and val/; global batch 1024 over all
devices and hosts, i.e. the official 8 GPUs x 128):

    python -m train.main --config configs/deit_t.py --workdir runs/deit_t \
        --config.data.root=/path/to/imagenet

Hyper-parameters (vig-reference.md sections 5.1 and 10): BASE_LR 0.0005 (peak LR
0.0005 x 1024 / 512), warm-up LR 5e-7 and min LR 5e-6 scaled alike, weight decay 0.05 (none on
1-D parameters and biases), drop path 0.1, 300 epochs with 5 warm-up epochs (per-step
cosine), AdamW (0.9, 0.999, 1e-8), global-norm clip 5, EMA 0.9999, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, mixup 0.8 / cutmix 1.0 (switch 0.5), label
smoothing 0.1. The ViG recipe with DeiT's own settings where they differ (Touvron et al.
2021: BASE_LR 5e-4, 5 warm-up epochs, drop path 0.1); bfloat16 compute, cuDNN flash
attention on GPUs. Target from the DeiT paper, Table 1 (DeiT also used repeated
augmentation, not done here).

Target: 72.2 top-1 on ImageNet-1k val, 5.72M parameters.

Arguments (configs/default.py): ``:quick`` (bundled mini CIFAR-10 at 32 px, minutes on a CPU),
``:cifar`` (the full CIFAR-10 image folder at 32 px; patch_size 4, i.e. 8 x 8 tokens),
``:fake`` (random images), comma-separated, e.g. ``configs/deit_t.py:cifar,fake``.
"""

from configs import default


def get_config(arg=None):
    """DeiT-T config; ``arg``: see the module docstring."""
    return default.variant(
        arg,
        name="deit_t",
        lr=0.0005,
        drop_path_rate=0.1,
        weight_decay=0.05,
        dtype="bfloat16",
        warmup_epochs=5.0,
    )
