"""Byte and FLOP model of HorNet's gnconv: eager vs fused (arithmetic only;
HorNet's channel split comes from resfuse.reference). bench/ only: no
installed module needs it.

The counting rules are ``bench/model/rules.py``'s (one call on N images;
each kernel reads its operands from HBM and writes its result; a fused
kernel reads each input once and writes each output once; weights once;
a multiply-add is 2 FLOPs, gates and scales are not counted). Every design
below is a list of ``Step``s, one per eager op or fused kernel, and every
total is their sum (``gnconv_bytes`` included: the closed forms below are
what the steps add up to, checked by hand in tests/test_bench_model.py).

Per pixel, with dims = [d0, 2 d0, ..., D] (order o), S = sum(dims) = 2D - d0,
k x k depthwise, in elements:

eager (HorNet's code, one kernel per op, 2o + 3 launches)::

    proj_in             D  + 2D
    dwconv(abc)         S  + S
    * scale             S  + S
    pwa * dw_0          2 d0 + d0
    per stage i < o-1   pws: dims[i] + dims[i+1];  gate: 2 dims[i+1] + dims[i+1]
    proj_out            D  + D
    norm1 (HorBlock)    14D + 9 over 10 kernels (mean, sub, pow, mean, sub, +eps,
                        sqrt, div, *weight, +bias, as HorNet's LayerNorm runs)
    residual            gamma1 * y: 2D;  x + .: 3D   (2 kernels)

fused (resfuse: kernels/gnconv.py, 2 launches; with the LayerNorm in fp16/bf16
a third, ``ln_fold_weight``, reads W_in again and writes W' = W_in diag(lnw)
(2D x D), which the GEMM reads back: 6D^2 elements per call, whatever the batch)::

    kernel 1  LN? + proj_in       x: D read, f: 2D written
    kernel 2  dw + gates + chain  f: 2D read (pwa d0 + abc S), y: D written,
              + proj_out (+res)   residual: D read

stepwise (the per-op fusion: dw + bias + scale + first gate in one kernel
that reads f once and writes x_0 and the other gates, then one GEMM per
gated 1x1 with its gate in the epilogue; o + 2 launches)::

    kernel 1  D + 2D;   dw kernel  2D + S;   gated 1x1 i  dims[i] + 2 dims[i+1];
    proj_out  D + D (+ D residual)

minimal (one kernel for everything, which the depthwise halo rules out
without recomputing the projection): x read, y written (+ residual).

Training (forward + backward) and the whole HorBlock
----------------------------------------------------
``gnconv_train_bytes`` (a gnconv forward + backward, optionally with
HorBlock's norm1 and residual) and ``horblock_bytes`` (a HorBlock: eval
forward, or forward + backward) write both designs as lists of ``Step``s,
one line of code per eager op and per fused kernel, in the order they run,
and sum them (``StepTraffic.eager_steps`` / ``fused_steps`` keep the lines:
``python -m bench.model.gnconv --steps 3`` prints stage 3's). Rules
added to the ones above:

- the backward starts from a given dout (its producer is not counted); x
  requires grad, so proj_in's dgrad runs; the residual's own gradient is
  dout itself (0 bytes);
- autograd's saved tensors are not written again; each backward op reads
  what it uses of them;
- a tensor that receives several gradients costs one add kernel (2 read,
  1 written) per extra gradient, in both designs (so with a residual,
  ``dx_total = dout + dx`` is 3D in eager and fused alike);
- parameters count 3x in training, in both designs: read by the forward,
  read by the backward, gradient written once (``zero_grad(set_to_none=True)``
  before each step: no accumulation into ``.grad``); the fused depthwise
  backward's per-program fp32 partials of dW/db count as that write;
- LayerNorm statistics (mean, rstd: 2 per pixel) are float32 (float64 for
  float64 input) and counted at that size: eager F.layer_norm writes them
  in the forward and its backward reads them; the fused LayerNorm
  backward (a dgrad epilogue) writes them for the wgrad that follows;
- FLOPs are forward + backward, each GEMM's backward (dgrad + wgrad) and
  the depthwise conv's 2x its forward: 3x the forward. ``recompute_flops``
  is what the fused backward computes again on top (the dwconv and the pws
  GEMMs: the chain's stages and gates are recomputed from f, not saved);
  they are in the fused kernels' floors, not in ``flops``.

Eager is what PyTorch runs for HorNet's code (tests/test_bench_model.py
checks the per-pixel bytes and kernel counts against a TorchDispatchMode
trace of the aten ops), each aten op taken as CUDA kernels this way:
``convolution_backward`` = dgrad (reads dy, writes dx) + wgrad (reads dy, x)
+ bias grad (``dy.sum((0, 2, 3))``: reads dy), 3 kernels; ``addmm`` (Linear
with bias) 1 kernel (cuBLASLt bias epilogue); ``mm`` 1;
``native_layer_norm_backward`` 2 (dX; dgamma + dbeta, both reading dy, x
and the stats; PyTorch adds a small third one, reducing partials, when
N*H*W > 65536: not counted); a broadcast operand's gradient (layer scale,
LN affine, the LN's per-pixel mean) is a full-size product and then one
``sum`` kernel; split's backward is a ``cat``; every other aten op 1
kernel. The input is channels_last, as the benchmark runs it, so
``x.permute(0, 2, 3, 1)`` is a contiguous NHWC tensor: F.layer_norm makes
no copy and F.linear flattens it into one ``addmm`` (on an NCHW input
F.layer_norm would copy its input and autograd would copy x's gradient to
x's layout: not counted here).

gnconv backward, eager (5 o + 9 kernels)::

    proj_out           dgrad D + D, wgrad D + D, bias D
    stage i = o-2..0   a = dims[i], b = dims[i+1]: dz = dx * g: 3b, dg = dx * z: 3b,
                       dgrad b + a, wgrad b + a, bias b
    x0 = pwa * g0      d_pwa 3 d0, d_g0 3 d0
    split's cat        2S;   * s: 2S
    dwconv             dgrad 2S, wgrad 2S, bias S
    split's cat        (d_pwa, d_abc): 4D
    proj_in            dgrad 3D, wgrad 3D, bias 2D
    norm1 (HorBlock)   40D + 16 over 24 kernels (the 10-op LayerNorm's autograd)
    residual           d(gamma1 * y): 2D, 3D, sum D (3 kernels);  dout + dx: 3D

gnconv backward, fused (o + 4 kernels; the residual's add + 1)::

    gnconv_chain_bwd   f 2D, dout D read; d_f[:, :d0] d0, d_dw S (the gates' gradient), x_i S,
                       dz_i S - d0 written (stages and gates recomputed from f)
    dwconv_bwd         d_dw S, abc S read; d_abc S written (dW, db: per-program fp32 partials)
    conv1x1_wgrad      pws i (o-1 launches): dz_i b + x_i a;  proj_out: dout D + x_{o-1} D
                       (gamma1's gradient comes out of proj_out's wgrad reduction)
    conv1x1_dgrad      proj_in (+ the LayerNorm backward with norm1; its second pass
                       over d_f is served by L2): d_f 2D (+ x D) read, dx D written
                       (+ the LayerNorm's mean, rstd: 2 stats written)
    conv1x1_wgrad      proj_in: d_f 2D + x D (+ the 2 stats read: LN(x) recomputed)
    residual           dx_total = dout + dx: 3D

HorBlock MLP half (C = D channels, hidden 4C), eager (6 kernels forward,
13 backward)::

    forward    F.layer_norm C + C + 2 stats;  pwconv1 C + 4C;  GELU 8C;  pwconv2 4C + C;
               gamma2 * .: 2C;  x + .: 3C
    backward   d(gamma2 * z): 2C, 3C, sum C;  pwconv2: dgrad C + 4C, wgrad C + 4C, bias C;
               GELU backward 12C;  pwconv1: dgrad 4C + C, wgrad 4C + C, bias 4C;
               layer_norm backward (3C + 2 stats) + (2C + 2 stats);  dout + dx: 3C

fused (2 kernels forward, 4 + 1 backward)::

    M1      ln_conv1x1: norm2 + pwconv1 + bias           x C read, a 4C written (pre-GELU)
    M2      GELU(a) + pwconv2 + bias + gamma2 + drop-path scale + residual:
                                                         a 4C, x C read, out C written
    dgrad2  (gamma2 mask dout) W2 * gelu'(a)             dout C, a 4C read, d_a 4C written
    wgrad2                                               dout C, a 4C read
    dgrad1 + LN backward                                 d_a 4C, x C read, dx C + 2 stats written
    wgrad1                                               d_a 4C, x C, 2 stats read
    dout + dx                                            3C

A HorBlock is norm1 + gnconv + residual (the gnconv model with norm and
residual: fused 2 + 2 kernels forward) then the MLP half; training runs
the MLP's backward first, whose dx is the gnconv half's dout.
"""

from dataclasses import dataclass
from typing import List, Tuple

from resfuse.hornet import HORNET_T_STAGES  # HorNet-T's (dim, order, H=W) per stage: the one copy
from resfuse.reference import gnconv_dims  # HorNet's channel split: the one definition

from .rules import elem_bytes, mac_flops, stat_bytes


@dataclass(frozen=True)
class GnConvTraffic:
    """FLOPs, HBM bytes and launches of one gnconv forward."""
    flops: int
    weight_bytes: int
    eager_bytes: int
    fused_bytes: int
    stepwise_bytes: int
    minimal_bytes: int
    eager_launches: int
    fused_launches: int
    stepwise_launches: int
    steps: "StepTraffic"  # eager and fused (Triton) step lists, whose sums the fields above are

    @property
    def saving(self) -> float:
        """eager bytes / fused bytes."""
        return self.eager_bytes / self.fused_bytes


def gnconv_bytes(dim: int, order: int, H: int, W: int, batch: int, dtype: str = "float16", *,
                 ksize: int = 7, norm: bool = False, residual: bool = False) -> GnConvTraffic:
    """One gnconv forward in the four designs of the module docstring, each
    the sum of its step list. ``norm``: HorBlock's norm1 feeds proj_in
    (eager: HorNet's 10-kernel LayerNorm; fused: kernel 1's prologue).
    ``residual``: ``x + gamma1 * y`` follows (eager: 2 kernels; fused:
    kernel 2's epilogue)."""
    fused = gnconv_train_bytes(dim, order, H, W, batch, dtype, ksize=ksize, norm=norm, residual=residual,
                               train=False)
    stepwise = gnconv_train_bytes(dim, order, H, W, batch, dtype, ksize=ksize, norm=norm, residual=residual,
                                  train=False, design="cuda")
    minimal = gnconv_train_bytes(dim, order, H, W, batch, dtype, ksize=ksize, norm=norm, residual=residual,
                                 train=False, design="minimal")
    return GnConvTraffic(
        flops=fused.flops, weight_bytes=fused.param_bytes, eager_bytes=fused.eager_bytes,
        fused_bytes=fused.fused_bytes, stepwise_bytes=stepwise.fused_bytes, minimal_bytes=minimal.fused_bytes,
        eager_launches=fused.eager_launches, fused_launches=fused.fused_launches,
        stepwise_launches=stepwise.fused_launches, steps=fused)


def hornet_t_table(batch: int = 32, dtype: str = "float16", **kw) -> List[Tuple[int, int, int, GnConvTraffic]]:
    """(dim, order, H, traffic) for each HorNet-T stage."""
    return [(d, o, h, gnconv_bytes(d, o, h, h, batch, dtype, **kw)) for d, o, h in HORNET_T_STAGES]


# ----------------------------------------------------------------------------
# Training and the whole HorBlock: both designs step by step
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One line of a design: an eager op (its ``launches`` CUDA kernels) or
    a fused kernel. Per pixel: ``elems`` activation elements read +
    written, ``stats`` LayerNorm-statistic elements (float32/64), ``flops``
    (fused kernels only: what the kernel computes, recomputation included).
    Per call, whatever the pixel count: ``param_elems`` elements of
    parameter-derived tensors moved on top of the parameters themselves
    (the 16-bit LayerNorm fold's W' written and read back) and
    ``param_stats`` fp32 elements of them (its u, v). ``sixteen_bit``: the
    step runs for fp16/bf16 only. ``autograd``: a kernel autograd itself
    runs in the fused design too (a gradient accumulation), not one of
    resfuse's."""
    what: str
    launches: int
    elems: int
    stats: int = 0
    flops: int = 0
    autograd: bool = False
    param_elems: int = 0
    param_stats: int = 0
    sixteen_bit: bool = False


@dataclass(frozen=True)
class StepTraffic:
    """FLOPs, HBM bytes and launches of one call of a gnconv or HorBlock,
    forward or forward + backward, from its two step lists."""
    flops: int             # useful FLOPs (training: forward + backward = 3x forward)
    recompute_flops: int   # what the fused backward computes again on top of `flops`
    param_bytes: int       # parameters moved, eager and fused alike (training: 3x)
    eager_bytes: int
    fused_bytes: int
    eager_launches: int
    fused_launches: int
    pixels: int            # N * H * W
    elem_bytes: int
    stat_bytes: int
    eager_steps: Tuple[Step, ...]
    fused_steps: Tuple[Step, ...]

    @property
    def saving(self) -> float:
        """eager bytes / fused bytes."""
        return self.eager_bytes / self.fused_bytes

    @property
    def fused_kernels(self) -> int:
        """resfuse's own launches in the fused design (``fused_launches``
        less autograd's accumulation adds)."""
        return sum(s.launches for s in self.fused_steps if not s.autograd)

    def step_bytes(self, step: Step) -> int:
        return (self.pixels * (step.elems * self.elem_bytes + step.stats * self.stat_bytes)
                + step.param_elems * self.elem_bytes + step.param_stats * 4)

    def fused_kernel_costs(self) -> List[Tuple[str, int, int]]:
        """(what, FLOPs, bytes) of each fused kernel, then one
        ('parameters', 0, param_bytes) line; the bytes sum to
        ``fused_bytes``, the FLOPs to ``flops + recompute_flops``."""
        out = [(s.what, self.pixels * s.flops, self.step_bytes(s)) for s in self.fused_steps]
        return out + [("parameters", 0, self.param_bytes)]


class _Shape:
    def __init__(self, dim: int, order: int, ksize: int):
        self.dims = gnconv_dims(dim, order)
        self.D, self.d0, self.S, self.k2, self.o = dim, self.dims[0], sum(self.dims), ksize * ksize, order
        self.pairs = list(zip(self.dims[:-1], self.dims[1:]))
        self.sum_ab = sum(a * b for a, b in self.pairs)

    def gnconv_params(self) -> int:  # proj_in, dwconv, pws, proj_out (weights and biases)
        D = self.D
        return (2 * D * D + 2 * D) + (self.S * self.k2 + self.S) + sum(a * b + b for a, b in self.pairs) + (D * D + D)

    def gnconv_flops(self) -> int:  # forward, per pixel
        return mac_flops(2 * self.D * self.D + self.S * self.k2 + self.sum_ab + self.D * self.D)


def _eager_layernorm_cf_forward(D: int) -> List[Step]:
    """HorNet's channels-first LayerNorm as its forward writes it (10 kernels, 14D + 9)."""
    return [
        Step("u = x.mean(1, keepdim=True)", 1, D + 1),          # reads x, writes u (1 per pixel)
        Step("c1 = x - u", 1, 2 * D + 1),
        Step("p = c1.pow(2)", 1, 2 * D),
        Step("s = p.mean(1, keepdim=True)", 1, D + 1),
        Step("c2 = x - u", 1, 2 * D + 1),                         # HorNet computes x - u twice
        Step("v = s + eps", 1, 2),
        Step("r = torch.sqrt(v)", 1, 2),
        Step("n = c2 / r", 1, 2 * D + 1),
        Step("m = weight[:, None, None] * n", 1, 2 * D),
        Step("xn = m + bias[:, None, None]", 1, 2 * D),
    ]


def _eager_layernorm_cf_backward(D: int) -> List[Step]:
    """Autograd of the 10 ops above, from dxn (24 kernels, 40D + 16). x's
    three gradients (through c2, c1 and u) cost two adds."""
    return [
        Step("dbias = dxn.sum((0, 2, 3))", 1, D),                  # AddBackward0: the engine's sum_to
        Step("dn = dxn * w", 1, 2 * D),                            # MulBackward0: grad * other
        Step("dw_full = dxn * n", 1, 3 * D),                       #               grad * self
        Step("dweight = dw_full.sum((0, 2, 3))", 1, D),
        Step("dc2 = dn / r", 1, 2 * D + 1),                        # DivBackward0: grad / other
        Step("t1 = c2 / r", 1, 2 * D + 1),                         #   other: -grad * self / other / other
        Step("t2 = -dn", 1, 2 * D),
        Step("t3 = t2 * t1", 1, 3 * D),
        Step("t4 = t3 / r", 1, 2 * D + 1),
        Step("dr = t4.sum(1, keepdim=True)", 1, D + 1),
        Step("t5 = 2 * r", 1, 2),                                  # SqrtBackward0: grad / (2 * result)
        Step("dv = dr / t5", 1, 3),                                # (v = s + eps passes dv on: ds = dv)
        Step("t6 = -dc2", 1, 2 * D),                               # SubBackward0 (c2 = x - u): other
        Step("du2 = t6.sum(1, keepdim=True)", 1, D + 1),
        Step("dp = ds.expand(...) / D", 1, D + 1),                 # MeanBackward1 (s)
        Step("t7 = c1.pow(1)", 1, 2 * D),                          # PowBackward0: grad * (2 * c1.pow(1))
        Step("t8 = 2 * t7", 1, 2 * D),
        Step("dc1 = dp * t8", 1, 3 * D),
        Step("t9 = -dc1", 1, 2 * D),                               # SubBackward0 (c1 = x - u): other
        Step("du1 = t9.sum(1, keepdim=True)", 1, D + 1),
        Step("dx = dc2 + dc1", 1, 3 * D),                          # x's gradients through c2 and c1 meet
        Step("du = du1 + du2", 1, 3),
        Step("dxu = du.expand(...) / D", 1, D + 1),                # MeanBackward1 (u)
        Step("dx = dx + dxu", 1, 3 * D),
    ]


def _eager_gnconv_forward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    D, S = g.D, g.S
    s = _eager_layernorm_cf_forward(D) if norm else []
    s += [
        Step("f = proj_in(xn)", 1, D + 2 * D),                      # reads x (or norm1's xn), writes f
        # pwa, abc = torch.split(f, (d0, S), dim=1): views, no kernel
        Step("dw = dwconv(abc)", 1, S + S),
        Step("g = dw * scale", 1, S + S),                            # then split into g0..g{o-1}: views
        Step("x0 = pwa * g0", 1, 3 * g.d0),
    ]
    for i, (a, b) in enumerate(g.pairs):
        s += [Step(f"z{i} = pws[{i}](x{i})", 1, a + b),
              Step(f"x{i + 1} = z{i} * g{i + 1}", 1, 3 * b)]
    s.append(Step(f"y = proj_out(x{g.o - 1})", 1, D + D))
    if residual:
        s += [Step("t = gamma1.view(C, 1, 1) * y", 1, 2 * D),     # drop_path: the identity (p = 0)
              Step("out = x + t", 1, 3 * D)]
    return s


def _eager_gnconv_backward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    D, S, o = g.D, g.S, g.o
    s = []
    if residual:  # out = x + t passes dout to x and t: no kernel
        s += [Step("dy = dout * gamma1_view", 1, 2 * D),          # MulBackward0
              Step("dgamma_full = dout * y", 1, 3 * D),
              Step("dgamma1 = dgamma_full.sum((0, 2, 3))", 1, D)]
    s += [Step(f"dx{o - 1} = dgrad(dy, proj_out.weight)", 1, D + D),   # convolution_backward: 3 kernels
          Step(f"dW_out = wgrad(dy, x{o - 1})", 1, D + D),
          Step("db_out = dy.sum((0, 2, 3))", 1, D)]
    for i in reversed(range(o - 1)):
        a, b = g.pairs[i]
        s += [Step(f"dz{i} = dx{i + 1} * g{i + 1}", 1, 3 * b),         # MulBackward0, both operands
              Step(f"dg{i + 1} = dx{i + 1} * z{i}", 1, 3 * b),
              Step(f"dx{i} = dgrad(dz{i}, pws[{i}].weight)", 1, b + a),
              Step(f"dW_pws{i} = wgrad(dz{i}, x{i})", 1, b + a),
              Step(f"db_pws{i} = dz{i}.sum((0, 2, 3))", 1, b)]
    s += [Step("dpwa = dx0 * g0", 1, 3 * g.d0),
          Step("dg0 = dx0 * pwa", 1, 3 * g.d0),
          Step("dg = torch.cat([dg0, ..., dg{o-1}], 1)", 1, 2 * S),       # SplitWithSizesBackward0
          Step("ddw = dg * scale", 1, 2 * S),                              # MulBackward1
          Step("dabc = dgrad(ddw, dwconv.weight)", 1, 2 * S),              # depthwise convolution_backward
          Step("dW_dw = wgrad(ddw, abc)", 1, 2 * S),
          Step("db_dw = ddw.sum((0, 2, 3))", 1, S),
          Step("df = torch.cat([dpwa, dabc], 1)", 1, 2 * D + 2 * D),      # reads d0 + S = 2D, writes 2D
          Step("dxn = dgrad(df, proj_in.weight)", 1, 2 * D + D),
          Step("dW_in = wgrad(df, xn)", 1, 2 * D + D),
          Step("db_in = df.sum((0, 2, 3))", 1, 2 * D)]
    if norm:
        s += _eager_layernorm_cf_backward(D)
    if residual:
        s.append(Step("dx_total = dout + dx", 1, 3 * D))            # x's gradients: residual + norm1/proj_in
    return s


def _ln_fold(K: int, C: int, what: str) -> Step:
    """kernels/conv1x1.py's 16-bit LayerNorm fold before a LN-prologue 1x1
    (K x C): W read a second time (its row maxima take the first read, the
    parameters' own), W' = W diag(lnw) / s written, then read by the GEMM
    in W's place (3KC), u, s and v (fp32, K each) written and read back."""
    return Step(f"W', u, s, v = ln_fold_weight({what})", 1, 0, param_elems=3 * K * C, param_stats=6 * K,
                sixteen_bit=True)


def _fused_gnconv_forward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    D, res = g.D, (g.D if residual else 0)
    chain = mac_flops(g.S * g.k2 + g.sum_ab + D * D)
    return [_ln_fold(2 * D, D, "proj_in, norm1")] * norm + [
        Step("f = ln_conv1x1(x)" if norm else "f = conv1x1(x)  # proj_in", 1, D + 2 * D, flops=mac_flops(2 * D * D)),
        Step("out = gnconv_chain(f" + (", x, gamma1)" if residual else ")"), 1, 2 * D + res + D, flops=chain),
    ]


def _fused_gnconv_backward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    D, S, o, d0 = g.D, g.S, g.o, g.d0
    recompute = mac_flops(S * g.k2 + g.sum_ab)
    s = [Step("gnconv_chain_bwd(f, dout) -> d_f[:, :d0], d_dw, x_i, dz_i", 1,
              2 * D + D + d0 + S + S + (S - d0), flops=recompute + mac_flops(D * D + g.sum_ab)),
         Step("dwconv_bwd(d_dw, abc) -> d_abc", 1, S + S + S, flops=mac_flops(2 * S * g.k2))]
    s += [Step(f"conv1x1_wgrad(dz{i}, x{i})  # pws[{i}]", 1, b + a, flops=mac_flops(a * b))
          for i, (a, b) in enumerate(g.pairs)]
    s += [Step(f"conv1x1_wgrad(dout, x{o - 1})  # proj_out", 1, D + D, flops=mac_flops(D * D)),
          Step("conv1x1_dgrad(d_f" + (", x) + LayerNorm backward" if norm else ")  # proj_in"), 1,
               2 * D + (D if norm else 0) + D, stats=2 if norm else 0, flops=mac_flops(2 * D * D)),  # writes mean, rstd
          Step("conv1x1_wgrad(d_f, x)  # proj_in", 1, 2 * D + D, stats=2 if norm else 0, flops=mac_flops(2 * D * D))]
    if residual:
        s.append(Step("dx_total = dout + dx", 1, 3 * D, autograd=True))
    return s


def _cuda_gnconv_forward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    """resfuse._C's forward (resfuse/ops/gnconv_cuda.py): the gate buffer
    [pwa*g_0 | g_1 .. g_{o-1}] reaches memory and each gated 1x1 rewrites
    its stage in place (o + 2 kernels: the stepwise design)."""
    D, res = g.D, (g.D if residual else 0)
    s = [Step("f = pixel_gemm(x" + (", LayerNorm prologue)" if norm else ")  # proj_in"), 1, D + 2 * D,
              flops=mac_flops(2 * D * D)),
         Step("buf = dwconv_gate(abc, pwa)  # [x_0 | g_1 ..]", 1, 2 * D + g.S, flops=mac_flops(g.S * g.k2))]
    s += [Step(f"buf_{i + 1} = (W buf_{i} + b) * buf_{i + 1}  # pws[{i}], in place", 1, a + 2 * b, flops=mac_flops(a * b))
          for i, (a, b) in enumerate(g.pairs)]
    s.append(Step("out = pixel_gemm(buf_o-1, W_out)" + (" * gamma1 + x" if residual else ""), 1, D + res + D,
                  flops=mac_flops(D * D)))
    return s


def _cuda_gnconv_backward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    """resfuse._C's backward: replay the gates and stages (x_i and z_i
    written), one data-gradient GEMM per stage (dz = acc*g, dg = acc*z),
    the depthwise backward, one weight gradient per 1x1 (partials not
    counted), proj_in's data gradient (+ LayerNorm rows backward)."""
    D, S, d0 = g.D, g.S, g.d0
    s = [Step("g = dwconv_gate(abc)  # replay", 1, S + S, flops=mac_flops(S * g.k2)),
         Step("x_0 = pwa * g_0  # torch.mul", 1, 3 * d0)]
    s += [Step(f"x_{i + 1}, z_{i + 1} = pixel_gemm(x_{i}) * g_{i + 1}  # replay", 1, a + 3 * b, flops=mac_flops(a * b))
          for i, (a, b) in enumerate(g.pairs)]
    dims = g.dims
    s.append(Step(f"dz_{g.o - 1}, dg_{g.o - 1} = pixel_gemm(dout, (gamma W_out)^T)", 1, D + 4 * D, flops=mac_flops(D * D)))
    s += [Step(f"dz_{i}, dg_{i} = pixel_gemm(dz_{i + 1}, W_{i}^T)" if i else "dpwa, dg_0 = pixel_gemm(dz_1, W_0^T)",
               1, dims[i + 1] + 4 * dims[i], flops=mac_flops(dims[i] * dims[i + 1])) for i in range(g.o - 2, -1, -1)]
    s.append(Step("d_abc, dW_dw = dwconv_gate_backward(dg, abc)", 1, 3 * S, flops=mac_flops(2 * S * g.k2)))
    s += [Step(f"pixel_wgrad(dz_{i + 1}, x_{i})  # pws[{i}]", 1, a + b, flops=mac_flops(a * b))
          for i, (a, b) in enumerate(g.pairs)]
    s.append(Step(f"pixel_wgrad(dout, x_{g.o - 1})  # proj_out", 1, 2 * D, flops=mac_flops(D * D)))
    if norm:
        s += [Step("dxhat = pixel_gemm(d_f, W_in^T)", 1, 2 * D + D, flops=mac_flops(2 * D * D)),
              Step("dx = layernorm_rows_backward(x, dxhat)", 1, 3 * D, stats=2),
              Step("pixel_wgrad(d_f, LN(x))  # proj_in", 1, 3 * D, stats=2, flops=mac_flops(2 * D * D))]
    else:
        s += [Step("dx = pixel_gemm(d_f, W_in^T)", 1, 3 * D, flops=mac_flops(2 * D * D)),
              Step("pixel_wgrad(d_f, x)  # proj_in", 1, 3 * D, flops=mac_flops(2 * D * D))]
    if residual:
        s.append(Step("dx_total = dout + dx", 1, 3 * D, autograd=True))
    return s


def _cuda_mlp_backward(C: int) -> List[Step]:
    return [
        Step("d_a = pixel_gemm(dout, (gamma2 W2)^T) * gelu'(a)", 1, C + 4 * C + 4 * C, flops=mac_flops(4 * C * C)),
        Step("pixel_wgrad(dout, gelu(a))  # pwconv2, gamma2", 1, C + 4 * C, flops=mac_flops(4 * C * C)),
        Step("dxhat = pixel_gemm(d_a, W1^T)", 1, 4 * C + C, flops=mac_flops(4 * C * C)),
        Step("dx = layernorm_rows_backward(x, dxhat)", 1, 3 * C, stats=2),
        Step("pixel_wgrad(d_a, LN(x))  # pwconv1, norm2", 1, 4 * C + C, stats=2, flops=mac_flops(4 * C * C)),
        Step("dx = dout + dx", 1, 3 * C, autograd=True),
    ]


def _minimal_gnconv_forward(g: _Shape, norm: bool, residual: bool) -> List[Step]:
    """The floor no design reaches: one kernel, x read and y written (the
    depthwise halo rules it out without recomputing proj_in). Forward only."""
    return [Step("out = gnconv(x)  # not built", 1, g.D + (g.D if residual else 0) + g.D)]


def _gnconv_forward_only(*args) -> List[Step]:
    raise ValueError("design='minimal' is gnconv's forward floor only (train=False, no HorBlock)")


#: Fused step lists per design: the Triton kernels (kernels/), resfuse._C (csrc/),
#: or the single-kernel floor ("minimal", gnconv forward only).
_DESIGNS = ("triton", "cuda", "minimal")


def _design(design: str):
    if design not in _DESIGNS:
        raise ValueError(f"design must be one of {_DESIGNS}, got {design!r}")
    if design == "cuda":
        return _cuda_gnconv_forward, _cuda_gnconv_backward, _plain_mlp_forward, _cuda_mlp_backward
    if design == "minimal":
        return _minimal_gnconv_forward, _gnconv_forward_only, _gnconv_forward_only, _gnconv_forward_only
    return _fused_gnconv_forward, _fused_gnconv_backward, _fused_mlp_forward, _fused_mlp_backward


def _eager_mlp_forward(C: int) -> List[Step]:
    """HorBlock's second half as HorNet writes it, on channels_last x:
    x.permute(0, 2, 3, 1) is contiguous NHWC, so no copy anywhere."""
    return [
        Step("yn = F.layer_norm(x.permute(0, 2, 3, 1), ...)", 1, C + C, stats=2),  # + mean, rstd (saved)
        Step("a = pwconv1(yn)", 1, C + 4 * C),                     # one addmm (bias in the epilogue)
        Step("h = act(a)", 1, 4 * C + 4 * C),                     # GELU
        Step("z = pwconv2(h)", 1, 4 * C + C),
        Step("t = gamma2 * z", 1, 2 * C),                         # drop_path(p = 0): the identity
        Step("out = x + t.permute(0, 3, 1, 2)", 1, 3 * C),
    ]


def _eager_mlp_backward(C: int) -> List[Step]:
    return [
        Step("dz = dout * gamma2", 1, 2 * C),                     # out = x + t: dout passes to both
        Step("dgamma_full = dout * z", 1, 3 * C),
        Step("dgamma2 = dgamma_full.sum((0, 1, 2))", 1, C),
        Step("dh = dz @ W2", 1, C + 4 * C),                       # AddmmBackward0: mm
        Step("dW2 = dz.t() @ h", 1, C + 4 * C),                   #                 mm
        Step("db2 = dz.sum(0)", 1, C),
        Step("da = gelu_backward(dh, a)", 1, 4 * C + 4 * C + 4 * C),
        Step("dyn = da @ W1", 1, 4 * C + C),
        Step("dW1 = da.t() @ yn", 1, 4 * C + C),
        Step("db1 = da.sum(0)", 1, 4 * C),
        Step("dxp = layer_norm_backward: dX", 1, C + C + C, stats=2),      # reads dyn, x, mean, rstd
        Step("dnorm2 = layer_norm_backward: dgamma, dbeta", 1, C + C, stats=2),
        Step("dx = dout + dxp.permute(0, 3, 1, 2)", 1, 3 * C),  # x's gradients: residual + MLP
    ]


def _fused_mlp_forward(C: int) -> List[Step]:
    return [_ln_fold(4 * C, C, "pwconv1, norm2")] + _plain_mlp_forward(C)


def _plain_mlp_forward(C: int) -> List[Step]:
    return [
        Step("a = ln_conv1x1(x)  # norm2 + pwconv1 + bias", 1, C + 4 * C, flops=mac_flops(4 * C * C)),
        Step("out = x + gamma2 * mask * pwconv2(gelu(a))", 1, 4 * C + C + C, flops=mac_flops(4 * C * C)),
    ]


def _fused_mlp_backward(C: int) -> List[Step]:
    return [
        Step("d_a = conv1x1_dgrad(gamma2 * mask * dout, W2) * gelu'(a)", 1, C + 4 * C + 4 * C, flops=mac_flops(4 * C * C)),
        Step("conv1x1_wgrad(gamma2 * mask * dout, gelu(a))  # pwconv2, gamma2", 1, C + 4 * C, flops=mac_flops(4 * C * C)),
        Step("dx = conv1x1_dgrad(d_a, W1) + LayerNorm backward", 1, 4 * C + C + C, stats=2, flops=mac_flops(4 * C * C)),
        Step("conv1x1_wgrad(d_a, LN(x))  # pwconv1, norm2", 1, 4 * C + C, stats=2, flops=mac_flops(4 * C * C)),
        Step("dx = dout + dx", 1, 3 * C, autograd=True),
    ]


def _totals(eager: List[Step], fused: List[Step], *, flops_px: int, recompute_px: int, params: int,
            P: int, dtype: str) -> StepTraffic:
    e = elem_bytes(dtype)
    st = stat_bytes(dtype)
    if e > 2:
        fused = [s for s in fused if not s.sixteen_bit]

    def bytes_(steps):
        return (P * sum(s.elems * e + s.stats * st for s in steps) + params * e
                + sum(s.param_elems * e + s.param_stats * 4 for s in steps))

    return StepTraffic(
        flops=P * flops_px, recompute_flops=P * recompute_px, param_bytes=params * e,
        eager_bytes=bytes_(eager), fused_bytes=bytes_(fused),
        eager_launches=sum(s.launches for s in eager), fused_launches=sum(s.launches for s in fused),
        pixels=P, elem_bytes=e, stat_bytes=st, eager_steps=tuple(eager), fused_steps=tuple(fused))


def gnconv_train_bytes(dim: int, order: int, H: int, W: int, batch: int, dtype: str = "float16", *,
                       ksize: int = 7, norm: bool = False, residual: bool = False, train: bool = True,
                       design: str = "triton") -> StepTraffic:
    """One training step's forward + backward of a gnconv (the module
    docstring's model), x requiring grad. ``norm``: HorBlock's norm1 in
    front; ``residual``: ``x + gamma1 * gnconv(.)`` after (as
    ``gnconv_bytes``). ``train=False``: the forward alone. ``design``:
    the fused kernels' steps, "triton" (kernels/) or "cuda" (csrc/)."""
    g = _Shape(dim, order, ksize)
    fwd, bwd, _, _ = _design(design)
    eager, fused = _eager_gnconv_forward(g, norm, residual), fwd(g, norm, residual)
    if train:
        eager, fused = eager + _eager_gnconv_backward(g, norm, residual), fused + bwd(g, norm, residual)
    params = g.gnconv_params() + (2 * dim if norm else 0) + (dim if residual else 0)
    t = 3 if train else 1
    return _totals(eager, fused, flops_px=t * g.gnconv_flops(),
                   recompute_px=mac_flops(g.S * g.k2 + g.sum_ab) if train else 0,
                   params=t * params, P=batch * H * W, dtype=dtype)


def horblock_bytes(dim: int, order: int, H: int, W: int, batch: int, dtype: str = "float16", *,
                   train: bool, ksize: int = 7, design: str = "triton") -> StepTraffic:
    """A HorBlock (norm1, gnconv, gamma1, residual; norm2, pwconv1, GELU,
    pwconv2, gamma2, residual; drop_path the identity): the eval forward,
    or with ``train`` forward + backward (x requiring grad)."""
    g = _Shape(dim, order, ksize)
    C = dim
    gfwd, gbwd, mfwd, mbwd = _design(design)
    eager = _eager_gnconv_forward(g, True, True) + _eager_mlp_forward(C)
    fused = gfwd(g, True, True) + mfwd(C)
    if train:  # autograd runs the MLP half's backward first; its dx is the gnconv half's dout
        eager += _eager_mlp_backward(C) + _eager_gnconv_backward(g, True, True)
        fused += mbwd(C) + gbwd(g, True, True)
    params = g.gnconv_params() + 3 * C + (2 * C + 4 * C * C + 4 * C + 4 * C * C + C + C)
    flops_px = g.gnconv_flops() + mac_flops(8 * C * C)
    return _totals(eager, fused, flops_px=(3 if train else 1) * flops_px,
                   recompute_px=mac_flops(g.S * g.k2 + g.sum_ab) if train else 0,
                   params=(3 if train else 1) * params, P=batch * H * W, dtype=dtype)


def hornet_t_train_table(batch: int = 32, dtype: str = "float16", **kw) -> List[Tuple[int, int, int, StepTraffic]]:
    """(dim, order, H, gnconv forward + backward traffic) for each HorNet-T stage."""
    return [(d, o, h, gnconv_train_bytes(d, o, h, h, batch, dtype, **kw)) for d, o, h in HORNET_T_STAGES]


def hornet_t_horblock_table(batch: int = 32, dtype: str = "float16", *, train: bool
                            ) -> List[Tuple[int, int, int, StepTraffic]]:
    """(dim, order, H, HorBlock traffic) for each HorNet-T stage."""
    return [(d, o, h, horblock_bytes(d, o, h, h, batch, dtype, train=train)) for d, o, h in HORNET_T_STAGES]


def _print_steps(t: StepTraffic) -> None:
    for title, steps in (("eager", t.eager_steps), ("fused", t.fused_steps)):
        print(f"  {title}: {sum(s.launches for s in steps)} launches")
        for s in steps:
            print(f"    {s.what:<66}{t.step_bytes(s) / 1e6:>9.2f} MB")
        print(f"    {'parameters':<66}{t.param_bytes / 1e6:>9.2f} MB")


def main(argv=None) -> None:
    import argparse
    p = argparse.ArgumentParser(prog="python -m bench.model.gnconv",
                                description="HorNet-T byte model tables (batch 32, fp16)")
    p.add_argument("--steps", type=int, choices=(1, 2, 3, 4),
                   help="also print every step of this stage's HorBlock forward + backward")
    args = p.parse_args(argv)
    for kw in ({}, {"norm": True, "residual": True}):
        print(f"HorNet-T gnconv, batch 32, fp16{' + norm1 + residual' if kw else ''}:")
        print(f"  {'stage':<22}{'eager MB':>10}{'fused MB':>10}{'stepwise':>10}{'minimal':>10}"
              f"{'x less':>8}{'launches':>10}{'GFLOP':>8}")
        for d, o, h, t in hornet_t_table(**kw):
            print(f"  D={d:<4} o={o} {h}x{h:<8}{t.eager_bytes / 1e6:>10.1f}{t.fused_bytes / 1e6:>10.1f}"
                  f"{t.stepwise_bytes / 1e6:>10.1f}{t.minimal_bytes / 1e6:>10.1f}{t.saving:>8.2f}"
                  f"{t.eager_launches:>6} -> {t.fused_launches}{t.flops / 1e9:>8.1f}")
    for title, rows in (("gnconv forward + backward", hornet_t_train_table()),
                        ("HorBlock forward (eval)", hornet_t_horblock_table(train=False)),
                        ("HorBlock forward + backward", hornet_t_horblock_table(train=True))):
        print(f"HorNet-T {title}, batch 32, fp16:")
        print(f"  {'stage':<22}{'eager MB':>10}{'fused MB':>10}{'x less':>8}{'launches':>12}{'GFLOP':>8}"
              f"{'+recomp':>9}")
        for d, o, h, t in rows:
            print(f"  D={d:<4} o={o} {h}x{h:<8}{t.eager_bytes / 1e6:>10.1f}{t.fused_bytes / 1e6:>10.1f}"
                  f"{t.saving:>8.2f}{t.eager_launches:>7} -> {t.fused_launches:<3}{t.flops / 1e9:>8.1f}"
                  f"{t.recompute_flops / 1e9:>9.1f}")
    if args.steps:
        d, o, h = HORNET_T_STAGES[args.steps - 1]
        print(f"HorBlock forward + backward, stage {args.steps} (D={d}, order {o}, {h}x{h}), batch 32, fp16:")
        _print_steps(horblock_bytes(d, o, h, h, 32, "float16", train=True))


if __name__ == "__main__":  # python -m bench.model.gnconv [--steps N]
    main()
