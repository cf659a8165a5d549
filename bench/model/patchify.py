"""Byte model of a patchify layer, ``y = LN_post(conv2d(LN_pre(x), W, b,
stride=P))`` (W: K x C x P x P, no padding; each channels-first LayerNorm
optional): eager vs fused (kernels/patchify.py, one kernel), forward only.
HorNet-T's stem (conv 3 -> 64, 4x4 stride 4, then LayerNorm over 64) and
its 3 downsampling layers (LayerNorm over C, then conv 2x2 stride 2,
C -> 2C): ``hornet_t_patchify_table``, printed by ``python -m
bench.model.patchify``.

The counting rules are ``bench/model/rules.py``'s; the steps, their sums
(``StepTraffic``), HorNet's channels-first LayerNorm (10 kernels, 14C + 9
per pixel: mean, sub, pow, mean, sub again, +eps, sqrt, div, *weight,
+bias) and the 16-bit LayerNorm fold are ``bench/model/gnconv.py``'s, used
here as they are. Per output pixel (M = N * H/P * W/P of them; H and W
multiples of P, as HorNet's are), in elements:

eager (HorNet's code: the LayerNorm's 10 kernels, one conv kernel; 11 launches)::

    LN_pre   P*P (14C + 9)     (the LayerNorm runs on the P*P input pixels of each patch)
    conv     P*P*C + K         (reads x, writes y; bias in the conv kernel)
    LN_post  14K + 9

fused (kernels/patchify.py, 1 launch; + 1 with LN_pre in fp16/bf16)::

    patchify_conv   P*P*C + K  (x read once from HBM, y written; LN_post's statistics
                                stay in registers; LN_pre's two statistics passes
                                re-read each tap's x tiles from L2, which the model
                                does not count as HBM traffic)
    ln_fold_weight  (LN_pre, 16-bit only; per call) W read again as K*P*P rows of C,
                    W' written and read back by the patchify kernel in W's place:
                    3 K*P*P*C elements; u, s, v: 6 K*P*P fp32 (written, read back)

Parameters (both designs, once per call): W K*C*P*P + bias K + each
LayerNorm's weight and bias (2C for LN_pre, 2K for LN_post). FLOPs:
2 K*C*P*P per output pixel (the LayerNorms are not counted).
"""

from dataclasses import replace
from typing import List, NamedTuple, Tuple

from resfuse.hornet import HORNET_T_STAGES  # HorNet-T's (dim, order, H=W) per stage: the one copy

from .gnconv import Step, StepTraffic, _eager_layernorm_cf_forward, _ln_fold, _totals
from .rules import mac_flops


def _per_patch(steps: List[Step], pixels: int) -> List[Step]:
    """Steps counted per input pixel, counted per output pixel (``pixels``
    input pixels each)."""
    return [replace(s, elems=pixels * s.elems, stats=pixels * s.stats) for s in steps]


def patchify_bytes(C: int, K: int, P: int, H: int, W: int, batch: int, dtype: str = "float16", *,
                   pre_norm: bool = False, post_norm: bool = False) -> StepTraffic:
    """One patchify layer's forward (x: batch x C x H x W, W: K x C x P x P,
    stride P) eager and fused, each the sum of its step list (the module
    docstring). ``pre_norm``: HorNet's channels-first LayerNorm over C
    before the conv (a downsampling layer); ``post_norm``: over K after it
    (a stem)."""
    if H % P or W % P:
        raise ValueError(f"{H}x{W} is not a multiple of the {P}x{P} patch: the model counts whole patches")
    taps, red = P * P, P * P * C
    conv = Step("y = conv2d(x, W, b, stride=P)", 1, red + K)
    eager = (_per_patch(_eager_layernorm_cf_forward(C), taps) if pre_norm else []) + [conv]
    eager += _eager_layernorm_cf_forward(K) if post_norm else []
    fused = [_ln_fold(K * taps, C, "patchify, LN_pre")] if pre_norm else []
    fused.append(Step("y = patchify_conv(x" + (", LN_pre" if pre_norm else "") + (", LN_post" if post_norm else "")
                      + ")", 1, red + K, flops=mac_flops(K * red)))
    params = K * red + K + (2 * C if pre_norm else 0) + (2 * K if post_norm else 0)
    return _totals(eager, fused, flops_px=mac_flops(K * red), recompute_px=0, params=params,
                   P=batch * (H // P) * (W // P), dtype=dtype)


class PatchifyLayer(NamedTuple):
    """One of HorNet-T's patchify layers: ``name``, x's C x H x H, the conv's
    K and P, which LayerNorm."""
    name: str
    C: int
    H: int
    K: int
    P: int
    pre_norm: bool
    post_norm: bool


def hornet_t_patchify_layers(image: int = 224, in_chans: int = 3) -> List[PatchifyLayer]:
    """HorNet-T's stem and downsampling layers (resfuse/hornet.py's
    HorNetTrunk), from its stage table: the stem's patch is image / the
    first stage's size, each downsampling's the ratio of two stages' sizes."""
    (d0, _, h0), rest = HORNET_T_STAGES[0], HORNET_T_STAGES
    out = [PatchifyLayer("stem", in_chans, image, d0, image // h0, False, True)]
    for i, ((c, _, h), (k, _, h2)) in enumerate(zip(rest[:-1], rest[1:])):
        out.append(PatchifyLayer(f"downsample{i + 1}", c, h, k, h // h2, True, False))
    return out


def hornet_t_patchify_table(batch: int = 32, dtype: str = "float16"
                            ) -> List[Tuple[PatchifyLayer, StepTraffic]]:
    """(layer, traffic) for HorNet-T's stem and 3 downsampling layers."""
    return [(l, patchify_bytes(l.C, l.K, l.P, l.H, l.H, batch, dtype, pre_norm=l.pre_norm, post_norm=l.post_norm))
            for l in hornet_t_patchify_layers()]


def print_table(batch: int = 32, dtype: str = "float16") -> None:
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}.get(dtype, dtype)
    print(f"HorNet-T stem + downsampling (patchify_conv), batch {batch}, {short}:")
    print(f"  {'layer':<44}{'eager MB':>10}{'fused MB':>10}{'x less':>8}{'launches':>12}{'GFLOP':>8}")
    for l, t in hornet_t_patchify_table(batch, dtype):
        norm = "conv, LN" if l.post_norm else "LN, conv" if l.pre_norm else "conv"
        shape = f"{l.name:<12}{norm:<10}{l.C}->{l.K} P={l.P} {l.H}x{l.H}"
        print(f"  {shape:<44}{t.eager_bytes / 1e6:>10.1f}{t.fused_bytes / 1e6:>10.1f}{t.saving:>8.2f}"
              f"{t.eager_launches:>7} -> {t.fused_launches:<3}{t.flops / 1e9:>8.1f}")


if __name__ == "__main__":  # python -m bench.model.patchify
    print_table()
