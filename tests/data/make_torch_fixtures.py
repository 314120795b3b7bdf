"""Writes the PyTorch-made test fixtures in this folder (run once, where torch is installed).

    python tests/data/make_torch_fixtures.py tests/data

* ``tiny_checkpoint.pth``: a real ``torch.save`` file shaped like an official training
  checkpoint ({"model", "model_ema", "epoch", "max_accuracy", "config", "param"}) whose tensors
  cover fp32, fp16, bf16, int64, bool, a 0-d tensor, an empty tensor, a transposed
  (non-contiguous) view and a strided view with a storage offset sharing another tensor's
  storage; "config" is an instance of a class only this script defines.
* ``tiny_checkpoint_expected.npz``: the same tensors as NumPy arrays (bf16 as float32 values
  and as raw uint16 bits), for tests/test_convert.py.
* ``torch_reference.npz``: torch results the JAX code must reproduce: bicubic
  ``F.interpolate`` (align_corners=False, fp32, CPU), ``F.conv2d`` (stem, stride-2 and
  depthwise), ``F.linear``, ``F.layer_norm``, exact ``F.gelu`` (all float64), and
  ``torch.linspace`` drop-path rates (fp32).
"""

import collections
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F


class Config:
    """Stands for the yacs CfgNode the official training code pickles into checkpoints."""

    def __init__(self):
        self.MODEL = {"NAME": "tiny"}


def checkpoint_tensors(gen):
    base = torch.randn(4, 6, generator=gen)
    return collections.OrderedDict(
        fp32=torch.randn(3, 4, generator=gen),
        fp16=torch.randn(5, generator=gen).half(),
        bf16=torch.randn(2, 3, generator=gen).bfloat16(),
        int64=torch.arange(-3, 4, dtype=torch.int64) * 1_000_000_007,
        flag=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        base=base,
        transposed=base.t(),  # stride (1, 6): not contiguous
        sliced=base[1:, ::2],  # storage offset 6, stride (6, 2), same storage as base
    )


def expected_arrays(prefix, tensors):
    out = {}
    for key, t in tensors.items():
        if t.dtype == torch.bfloat16:
            out[f"{prefix}/{key}"] = t.float().numpy()
            out[f"{prefix}/{key}/bits"] = t.view(torch.int16).numpy().view(np.uint16)
        else:
            out[f"{prefix}/{key}"] = t.numpy()
    return out


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    model = checkpoint_tensors(gen)
    assert not model["transposed"].is_contiguous() and model["sliced"].storage_offset() == 6
    ema = checkpoint_tensors(gen)
    param = torch.nn.Parameter(torch.arange(3.0))
    torch.save(
        {
            "model": model,
            "model_ema": ema,
            "epoch": 7,
            "max_accuracy": 77.2,
            "config": Config(),
            "param": param,
        },
        os.path.join(out_dir, "tiny_checkpoint.pth"),
    )
    expected = {**expected_arrays("model", model), **expected_arrays("model_ema", ema)}
    expected["param"] = param.detach().numpy()
    np.savez_compressed(os.path.join(out_dir, "tiny_checkpoint_expected.npz"), **expected)

    ref = {}
    resizes = [
        ((14, 14), (24, 24)),
        ((14, 14), (7, 7)),
        ((14, 14), (9, 11)),
        ((5, 7), (11, 3)),
        ((1, 1), (3, 3)),
        ((2, 2), (1, 1)),
        ((4, 4), (40, 40)),
        ((8, 8), (10, 10)),
    ]
    for i, (src, dst) in enumerate(resizes):
        x = torch.randn(1, 2, *src, generator=gen)
        ref[f"bicubic/{i}/src"] = x.numpy()
        ref[f"bicubic/{i}/dst"] = F.interpolate(
            x, size=dst, mode="bicubic", align_corners=False
        ).numpy()

    d = torch.float64
    convs = {  # name: (x shape NCHW, weight OIHW, bias?, stride, padding, groups)
        "stem": ((2, 3, 20, 20), (8, 3, 9, 9), True, 8, 1, 1),
        "stride2": ((2, 4, 9, 9), (5, 4, 3, 3), True, 2, 1, 1),
        "depthwise": ((2, 6, 5, 7), (6, 1, 3, 3), False, 1, 1, 6),
    }
    for name, (xs, ws, bias, stride, pad, groups) in convs.items():
        x = torch.randn(*xs, generator=gen, dtype=d)
        w = torch.randn(*ws, generator=gen, dtype=d)
        b = torch.randn(ws[0], generator=gen, dtype=d) if bias else None
        ref[f"conv/{name}/x"], ref[f"conv/{name}/weight"] = x.numpy(), w.numpy()
        if bias:
            ref[f"conv/{name}/bias"] = b.numpy()
        ref[f"conv/{name}/y"] = F.conv2d(x, w, b, stride=stride, padding=pad, groups=groups).numpy()
    x, w, b = (torch.randn(*s, generator=gen, dtype=d) for s in ((4, 6), (5, 6), (5,)))
    ref.update(
        {
            "linear/x": x.numpy(),
            "linear/weight": w.numpy(),
            "linear/bias": b.numpy(),
            "linear/y": F.linear(x, w, b).numpy(),
        }
    )
    x, w, b = (torch.randn(*s, generator=gen, dtype=d) for s in ((2, 5, 7), (7,), (7,)))
    ref.update(
        {
            "layer_norm/x": x.numpy() * 3 + 1,
            "layer_norm/weight": w.numpy(),
            "layer_norm/bias": b.numpy(),
            "layer_norm/y": F.layer_norm(x * 3 + 1, (7,), w, b, eps=1e-5).numpy(),
        }
    )
    x = torch.linspace(-6, 6, 49, dtype=d)
    ref.update({"gelu/x": x.numpy(), "gelu/y": F.gelu(x).numpy()})
    for rate, depth in ((0.2, 12), (0.5, 12), (0.2, 11), (0.3, 23), (0.6, 23)):
        ref[f"linspace/{rate}/{depth}"] = torch.linspace(0, rate, depth).numpy()
    np.savez_compressed(os.path.join(out_dir, "torch_reference.npz"), **ref)
    for f in sorted(os.listdir(out_dir)):
        print(f, os.path.getsize(os.path.join(out_dir, f)), "bytes")
    print("torch", torch.__version__)


if __name__ == "__main__":
    main(sys.argv[1])
