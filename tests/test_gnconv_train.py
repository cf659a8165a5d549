"""Training HorNet through resfuse: the backward ops of gnconv and of the
HorBlock (``resfuse.ops.gnconv_backward``), their Triton kernels
(kernels/gnconv_bwd.py, kernels/conv1x1.py), ``FusedHorBlock``'s fused MLP
half and drop path, and a short training loop.

Every gradient is compared with float64 eager autograd of the user's own
module (tests/seed_hornet.py) by the rule of GUIDE §3 (tests/numerics.py):
``err <= max(2 * err_eager, floor)``, err_eager being the same module's
gradient in the tested dtype. Backward outputs and workspaces start as NaN
(RESFUSE_POISON_OUTPUTS=1), and each kernel test proves the backward
kernels ran (launch counters) and that the forward ran on triton.
"""

import copy
import zlib
from functools import partial

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import resfuse
from resfuse._backends import kernels_module
from resfuse.nn import FusedHorBlock

from numerics import assert_matches, rel_err
from seed_hornet import GlobalLocalFilter, HorBlock, HorLayerNorm, gnconv, randomize

DT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BWD_KERNELS = ("gnconv_chain_bwd", "dwconv_bwd", "conv1x1_dgrad", "conv1x1_wgrad")


def seed_of(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _launches():
    return dict(kernels_module("_common").LAUNCHES_BY_KERNEL)


def _forward_backward(module, x, g):
    """(output, {'x': dx, param name: grad}) of one forward + backward."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(g)
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return y.detach(), grads


def _place(m, device, dtype, layout):
    m = m.to(device=device, dtype=dtype)
    return m.to(memory_format=torch.channels_last) if layout == "cl" else m


def check_training(plain, x, device, dtype, layout, what, seed, backend="triton", rng_seed=None):
    """Forward and every gradient of resfuse.convert(plain) on `backend`
    against float64 autograd of `plain`, with eager `plain` in `dtype` as the
    error yardstick. rng_seed: reseed before each run (drop path)."""
    ref_m = copy.deepcopy(plain).to(device=device, dtype=torch.float64)
    eager_m = _place(copy.deepcopy(plain), device, dtype, layout)
    fused_m = resfuse.convert(_place(copy.deepcopy(plain), device, dtype, layout), backend=backend)
    x = x.to(device)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        g = torch.randn(eager_m(x.to(dtype)).shape, generator=torch.Generator().manual_seed(seed + 1))
    runs = {}
    for name, m, dt in (("ref", ref_m, torch.float64), ("eager", eager_m, dtype), ("fused", fused_m, dtype)):
        if rng_seed is not None:
            torch.manual_seed(rng_seed)
        gg = g.to(device=device, dtype=dt)
        runs[name] = _forward_backward(m, x.to(dt), gg.contiguous(memory_format=torch.channels_last)
                                       if layout == "cl" else gg)
    (y64, g64), (ye, ge), (yf, gf) = runs["ref"], runs["eager"], runs["fused"]
    errs = {"out": assert_matches(yf, y64, ye, dtype, f"{what}: output", seed)}
    assert set(gf) == set(g64), f"{what}: parameters differ: {sorted(set(gf) ^ set(g64))}"
    for n in g64:
        assert gf[n] is not None, f"{what}: no gradient for {n}"
        errs[n] = assert_matches(gf[n], g64[n], ge[n], dtype, f"{what}: grad {n}", seed)
    return fused_m, errs


# ----------------------------------------------------------------------------
# GnConv through the Triton kernels, forward and backward
# ----------------------------------------------------------------------------

GNCONV_CASES = [
    # dim, order, N, H, W, dtype, layout
    (8, 1, 1, 5, 7, "f32", "nchw"),
    (16, 2, 2, 5, 7, "f32", "cl"),
    (16, 3, 1, 3, 5, "f16", "nchw"),
    (32, 4, 1, 5, 3, "f32", "nchw"),
    (16, 5, 2, 3, 5, "f32", "cl"),       # d0 = 1
    (32, 5, 1, 4, 4, "f16", "cl"),
    (16, 2, 1, 3, 3, "bf16", "nchw"),    # 3x3 image, 7x7 kernel: every tap past the border somewhere
]


@pytest.mark.parametrize("dim,order,N,H,W,dt,layout", GNCONV_CASES,
                         ids=[f"d{c[0]}-o{c[1]}-{c[2]}x{c[3]}x{c[4]}-{c[5]}-{c[6]}" for c in GNCONV_CASES])
def test_gnconv_gradients_through_kernels(dim, order, N, H, W, dt, layout, device):
    what = f"gnconv d{dim} o{order} {N}x{H}x{W} {dt} {layout}"
    seed = seed_of(what)
    plain = randomize(gnconv(dim, order=order, s=1.0 / 3.0), seed)
    x = torch.randn(N, dim, H, W, generator=torch.Generator().manual_seed(seed))
    before = _launches()
    fused, _ = check_training(plain, x, device, DT[dt], layout, what, seed)
    after = _launches()
    assert {k: d.backend for k, d in fused.last_decisions.items()} == {"proj_in": "triton", "chain": "triton"}
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in BWD_KERNELS}
    # chain backward, depthwise backward, proj_in dgrad, wgrads: one per pws, proj_out, proj_in
    assert grew == {"gnconv_chain_bwd": 1, "dwconv_bwd": 1, "conv1x1_dgrad": 1, "conv1x1_wgrad": order + 1}, grew


def test_gflayer_gradients_through_kernels(device):
    """A gflayer (FFT filter, eager) between the kernels: its gradient comes
    back through the chain kernel's gate gradient."""
    seed = seed_of("gflayer")
    plain = randomize(gnconv(16, order=3, s=1.0 / 3.0, gflayer=GlobalLocalFilter, h=5, w=4), seed)
    x = torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(seed))
    before = _launches()
    check_training(plain, x, device, torch.float32, "nchw", "gflayer gnconv", seed)
    after = _launches()
    assert after["gnconv_chain_bwd"] == before.get("gnconv_chain_bwd", 0) + 1
    assert after.get("dwconv_bwd", 0) == before.get("dwconv_bwd", 0)  # no depthwise conv to differentiate


# ----------------------------------------------------------------------------
# HorBlock: norm1 + gnconv + gamma1 + residual, fused MLP half, drop path
# ----------------------------------------------------------------------------

HORBLOCK_CASES = [
    (16, 2, 2, 5, 7, "f32", "nchw"),
    (16, 3, 1, 3, 5, "f16", "cl"),
    (32, 5, 1, 3, 3, "f32", "cl"),
]


@pytest.mark.parametrize("dim,order,N,H,W,dt,layout", HORBLOCK_CASES,
                         ids=[f"d{c[0]}-o{c[1]}-{c[2]}x{c[3]}x{c[4]}-{c[5]}-{c[6]}" for c in HORBLOCK_CASES])
def test_horblock_gradients_through_kernels(dim, order, N, H, W, dt, layout, device):
    what = f"HorBlock d{dim} o{order} {N}x{H}x{W} {dt} {layout}"
    seed = seed_of(what)
    plain = randomize(HorBlock(dim, gnconv=partial(gnconv, order=order, s=1.0 / 3.0)), seed)
    x = torch.randn(N, dim, H, W, generator=torch.Generator().manual_seed(seed)) + 1.5  # LayerNorm offset
    before = _launches()
    fused, _ = check_training(plain, x, device, DT[dt], layout, what, seed)
    after = _launches()
    assert isinstance(fused, FusedHorBlock) and fused.unfused_reason() is None
    assert {k: d.backend for k, d in fused.last_decisions.items()} == dict.fromkeys(
        ("proj_in", "chain", "pwconv1", "pwconv2"), "triton")
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in BWD_KERNELS}
    assert grew == {"gnconv_chain_bwd": 1, "dwconv_bwd": 1, "conv1x1_dgrad": 3, "conv1x1_wgrad": order + 3}, grew


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_drop_path_same_masks_and_rng_as_the_original(backend, device):
    """Training with drop path: seeded, the fused block draws the same
    per-sample masks from the same RNG stream as the original (so outputs,
    gradients and the RNG state afterwards agree), and some samples are
    really dropped."""
    if backend == "eager" and device.type == "cuda":
        pytest.skip("the eager backend is checked on cpu")
    seed = seed_of("droppath" + backend)
    plain = randomize(HorBlock(16, drop_path=0.5, gnconv=partial(gnconv, order=2, s=1.0 / 3.0)), seed).train()
    x = torch.randn(8, 16, 3, 5, generator=torch.Generator().manual_seed(seed))
    fused, _ = check_training(plain, x, device, torch.float32, "nchw", f"drop path {backend}", seed,
                              backend=backend, rng_seed=1234)
    assert fused.unfused_reason() is None
    x = x.to(device)
    torch.manual_seed(99)
    with torch.no_grad():
        a = fused(x)
    state_fused = torch.random.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
    torch.manual_seed(99)
    with torch.no_grad():
        b = copy.deepcopy(plain).to(device)(x)
    state_plain = torch.random.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)
    assert torch.equal(state_fused, state_plain), "the fused block consumed the RNG differently"
    assert rel_err(a, b) <= 1e-5
    # Half the branches dropped: without the masks the outputs would differ a lot.
    plain_eval = copy.deepcopy(plain).to(device).eval()
    with torch.no_grad():
        assert rel_err(a, plain_eval(x)) > 1e-2


def test_unknown_drop_path_runs_the_original_forward():
    class Stochastic(nn.Module):  # no drop_prob: per-sample semantics unknown
        def forward(self, x):
            return x

    block = randomize(HorBlock(16, gnconv=partial(gnconv, order=2)), 3)
    block.drop_path = Stochastic()
    fused = FusedHorBlock.from_module(block, backend="eager")
    assert "drop_prob" in fused.unfused_reason()


def test_mlp_that_is_not_layernorm_linear_gelu_linear_runs_eager(device):
    """A tanh GELU (or any other activation) keeps the MLP half eager, with
    the reason, and the gnconv half fused; results still match."""
    block = randomize(HorBlock(16, gnconv=partial(gnconv, order=2, s=1.0 / 3.0)), 5)
    block.act = nn.GELU(approximate="tanh")
    x = torch.randn(1, 16, 3, 5, generator=torch.Generator().manual_seed(5))
    fused, _ = check_training(block, x, device, torch.float32, "nchw", "tanh-GELU block", 5)
    assert set(fused.last_decisions) == {"proj_in", "chain"}
    assert "MLP eager" in fused.extra_repr() and "approximate" in fused.extra_repr()


# ----------------------------------------------------------------------------
# A tiny HorNet trains as eager does
# ----------------------------------------------------------------------------

def tiny_hornet(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 2, stride=2), HorLayerNorm(16, eps=1e-6, data_format="channels_first"),
        HorBlock(16, drop_path=0.2, layer_scale_init_value=0.5, gnconv=partial(gnconv, order=3, s=1.0 / 3.0)),
        HorBlock(16, drop_path=0.2, layer_scale_init_value=0.5, gnconv=partial(gnconv, order=2, s=1.0 / 3.0)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    return randomize(m, seed)


def _train(model, x, labels, steps, dtype, device, rng_seed):
    model = model.to(device=device, dtype=dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(rng_seed)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = model(x.to(device=device, dtype=dtype))
        loss = nn.functional.cross_entropy(logits.to(torch.promote_types(dtype, torch.float32)), labels.to(device))
        loss.backward()
        opt.step()
        losses.append(loss.detach().double().reshape(1))
    return torch.cat(losses), model


@pytest.mark.slow  # a whole model trained through the interpreter, ~2-4 min on 2 cores
def test_tiny_hornet_trains_like_eager(device):
    """Four SGD steps (momentum, drop path on) of a two-HorBlock model: the
    fused run's losses and final weights match float64 eager training by the
    rule, with eager fp32 training as the yardstick."""
    seed = seed_of("tiny hornet")
    x = torch.randn(4, 3, 10, 14, generator=torch.Generator().manual_seed(seed))
    labels = torch.randint(0, 5, (4,), generator=torch.Generator().manual_seed(seed + 1))
    base = tiny_hornet(seed)
    l64, m64 = _train(copy.deepcopy(base), x, labels, 4, torch.float64, device, 7)
    l32, m32 = _train(copy.deepcopy(base), x, labels, 4, torch.float32, device, 7)
    before = _launches()
    fused = resfuse.convert(copy.deepcopy(base), backend="triton")
    assert sum(isinstance(m, FusedHorBlock) for m in fused.modules()) == 2
    lf, mf = _train(fused, x, labels, 4, torch.float32, device, 7)
    after = _launches()
    assert after["gnconv_chain_bwd"] - before.get("gnconv_chain_bwd", 0) == 8  # 2 blocks x 4 steps
    assert_matches(lf, l64, l32, torch.float32, "losses")
    assert not torch.allclose(l64[0], l64[-1]), "the loss did not move: the test would not see wrong gradients"
    p64 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    p32 = torch.cat([p.detach().reshape(-1) for p in m32.parameters()])
    pf = torch.cat([p.detach().reshape(-1) for p in mf.parameters()])
    assert_matches(pf, p64, p32, torch.float32, "weights after training")


# ----------------------------------------------------------------------------
# Autograd contract: gradcheck, double backward, sample_scale, opcheck, compile
# ----------------------------------------------------------------------------

def _f64(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


@pytest.mark.parametrize("order", [1, 3])
def test_gradcheck_chain_with_sample_scale_and_gelu_op(order):
    g = torch.Generator().manual_seed(order)
    D = 4 if order == 1 else 8
    dims = [D >> (order - 1 - i) for i in range(order)]
    S = sum(dims)
    f = _f64(2, dims[0] + S, 3, 4, g=g)
    w_dw, b_dw = _f64(S, 1, 3, 3, g=g, scale=0.3), _f64(S, g=g)
    w_pws = [_f64(dims[i + 1], dims[i], 1, 1, g=g, scale=0.5) for i in range(order - 1)]
    b_pws = [_f64(dims[i + 1], g=g) for i in range(order - 1)]
    w_out, b_out, ls, res = _f64(D, D, 1, 1, g=g, scale=0.5), _f64(D, g=g), _f64(D, g=g), _f64(2, D, 3, 4, g=g)
    ss = torch.tensor([2.0, 0.0], dtype=torch.float64)

    def chain(f, w_dw, b_dw, w_out, b_out, ls, res, *pws):
        return resfuse.gnconv_chain(f, list(pws[:order - 1]), list(pws[order - 1:]), w_out, b_out, w_dw=w_dw,
                                    b_dw=b_dw, scale=0.7, residual=res, layer_scale=ls, sample_scale=ss)
    assert torch.autograd.gradcheck(chain, (f, w_dw, b_dw, w_out, b_out, ls, res, *w_pws, *b_pws), fast_mode=True)
    a, w, b = _f64(2, 6, 3, 4, g=g), _f64(D, 6, 1, 1, g=g, scale=0.4), _f64(D, g=g)
    assert torch.autograd.gradcheck(
        lambda a, w, b, ls, res: resfuse.gelu_conv1x1(a, w, b, layer_scale=ls, sample_scale=ss, residual=res),
        (a, w, b, ls, res))


def test_double_backward_raises_clearly():
    block = FusedHorBlock.from_module(randomize(HorBlock(8, gnconv=partial(gnconv, order=2)), 1), backend="eager")
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward through .* is not supported"):
        gx.sum().backward()


def test_sample_scale_requiring_grad_is_refused():
    x = torch.randn(2, 6, 3, 3)
    w = torch.randn(4, 6, 1, 1)
    with pytest.raises(RuntimeError, match="sample_scale is not differentiable"):
        resfuse.gelu_conv1x1(x, w, sample_scale=torch.ones(2, requires_grad=True))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck_mlp_and_backward_ops(backend, device):
    if backend == "eager" and device.type == "cuda":
        pytest.skip("eager is checked on cpu")
    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 6, 3, 5, generator=g).to(device)
    w, b = torch.randn(4, 6, 1, 1, generator=g).to(device), torch.randn(4, generator=g).to(device)
    ls, ss = torch.randn(4, generator=g).to(device), torch.tensor([0.5]).to(device)
    res = torch.randn(1, 4, 3, 5, generator=g).to(device)
    torch.library.opcheck(torch.ops.resfuse.gelu_conv1x1.default, (a, w, b, ls, ss, res, backend))
    torch.library.opcheck(torch.ops.resfuse.gelu_conv1x1.default, (a, w, b, ls, ss, res, backend, False))
    dy = torch.randn(1, 4, 3, 5, generator=g).to(device)
    nw, nb = torch.randn(6, generator=g).to(device), torch.randn(6, generator=g).to(device)
    # The backward ops: their fake kernels promise what the real ones return
    # (opcheck's cross-checking dispatch modes do not run torch.func, which
    # their eager backend differentiates with; their autograd is the
    # double-backward error, tested apart).
    for op, args in ((torch.ops.resfuse.gelu_conv1x1_backward, (dy, a, w, b, ls, ss, [True] * 4, backend)),
                     (torch.ops.resfuse.layernorm_conv1x1_backward,
                      (dy, a, w, b, nw, nb, 1e-6, [True, True, False, True, True], backend))):
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args])
        assert [(t.shape, t.dtype, t.stride()) for t in real] == [(t.shape, t.dtype, t.stride()) for t in fake]


def test_torch_compile_training_step(device):
    """A compiled forward + backward of a fused HorBlock (fullgraph, the
    backward ops traced like the forward ones) gives the uncompiled
    gradients."""
    seed = seed_of("compile train")
    block = randomize(HorBlock(16, gnconv=partial(gnconv, order=3, s=1.0 / 3.0)), seed).to(device)
    fused = resfuse.convert(copy.deepcopy(block), backend="triton")
    x = torch.randn(1, 16, 3, 5, generator=torch.Generator().manual_seed(seed)).to(device)
    y0, g0 = _forward_backward(fused, x, torch.ones(1, 16, 3, 5, device=device))
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    y1, g1 = _forward_backward(compiled, x, torch.ones(1, 16, 3, 5, device=device))
    g1 = {k.replace("_orig_mod.", ""): v for k, v in g1.items()}
    assert rel_err(y1, y0) <= 1e-6 and set(g1) == set(g0)
    for n in g0:
        assert rel_err(g1[n], g0[n]) <= 1e-6, n


# ----------------------------------------------------------------------------
# The MLP's inference split: GELU in pwconv1's epilogue, pwconv2 a plain GEMM
# ----------------------------------------------------------------------------

def test_gradcheck_inference_split_ops():
    """layernorm_conv1x1(epilogue_gelu=True) and gelu_conv1x1(prologue_gelu=
    False) are differentiable (the first recomputes its pre-activation)."""
    g = torch.Generator().manual_seed(11)
    x, w1, b1 = _f64(2, 6, 3, 4, g=g), _f64(8, 6, 1, 1, g=g, scale=0.4), _f64(8, g=g)
    nw, nb = _f64(6, g=g), _f64(6, g=g)
    assert torch.autograd.gradcheck(
        lambda x, w, b, nw, nb: resfuse.layernorm_conv1x1(x, w, b, norm_weight=nw, norm_bias=nb, norm_eps=1e-6,
                                                          epilogue_gelu=True), (x, w1, b1, nw, nb))
    a, w2, b2, ls, res = _f64(2, 8, 3, 4, g=g), _f64(6, 8, 1, 1, g=g, scale=0.4), _f64(6, g=g), _f64(6, g=g), \
        _f64(2, 6, 3, 4, g=g)
    ss = torch.tensor([2.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, w, b, ls, res: resfuse.gelu_conv1x1(a, w, b, layer_scale=ls, sample_scale=ss, residual=res,
                                                      prologue_gelu=False), (a, w2, b2, ls, res))


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_inference_split_ops_match_float64(dt, device):
    """Both halves on Triton against the float64 reference by the rule, and
    their gradients on the Triton backward against float64 autograd
    (layernorm_conv1x1(epilogue_gelu=True)'s backward recomputes its
    pre-activation)."""
    seed = seed_of(f"split{dt}")
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 24, 5, 7, generator=g) + 0.5).to(device, dt).contiguous(memory_format=torch.channels_last)
    w1, b1 = (torch.randn(40, 24, 1, 1, generator=g) / 5).to(device, dt), torch.randn(40, generator=g).to(device, dt)
    nw, nb = (torch.rand(24, generator=g) + 0.5).to(device, dt), torch.randn(24, generator=g).to(device, dt)
    w2, b2 = (torch.randn(24, 40, 1, 1, generator=g) / 7).to(device, dt), torch.randn(24, generator=g).to(device, dt)
    ls = torch.randn(24, generator=g).to(device, dt)
    k = kernels_module("_common").LAUNCHES_BY_KERNEL
    before = k["ln_conv1x1"]
    h = resfuse.layernorm_conv1x1(x, w1, b1, norm_weight=nw, norm_bias=nb, norm_eps=1e-6, epilogue_gelu=True,
                                  backend="triton")
    y = resfuse.gelu_conv1x1(h, w2, b2, layer_scale=ls, residual=x, prologue_gelu=False, backend="triton")
    assert k["ln_conv1x1"] == before + 2

    def ref(dtype, split):
        c = [t.to(dtype) for t in (x, w1, b1, nw, nb, w2, b2, ls)]
        hr = resfuse.reference.layernorm_conv1x1_reference(c[0], c[1], c[2], c[3], c[4], 1e-6, split)
        return hr, resfuse.reference.gelu_conv1x1_reference(hr, c[5], c[6], c[7], None, c[0], not split)
    (h64, y64), (h_e, y_e) = ref(torch.float64, True), ref(dt, False)
    assert_matches(h, h64, torch.nn.functional.gelu(h_e), dt, "pwconv1 + GELU epilogue", seed)
    assert_matches(y, y64, y_e, dt, "pwconv2, no prologue", seed)
    # backward: gelu_conv1x1 without the prologue on Triton, against float64
    hh = h.detach().requires_grad_(True)
    w2g = w2.detach().requires_grad_(True)
    dy = torch.randn(y.shape, generator=g).to(device, dt)
    resfuse.gelu_conv1x1(hh, w2g, b2, layer_scale=ls, prologue_gelu=False, backend="triton").backward(dy)
    h64g, w64g = hh.detach().double().requires_grad_(True), w2.double().requires_grad_(True)
    resfuse.reference.gelu_conv1x1_reference(h64g, w64g, b2.double(), ls.double(), None, None, False).backward(
        dy.double())
    he, we = hh.detach().requires_grad_(True), w2.detach().requires_grad_(True)
    resfuse.reference.gelu_conv1x1_reference(he, we, b2, ls, None, None, False).backward(dy)
    assert_matches(hh.grad, h64g.grad, he.grad, dt, "d a", seed)
    assert_matches(w2g.grad, w64g.grad, we.grad, dt, "d w2", seed)
    # layernorm_conv1x1 with the GELU epilogue on Triton: its backward
    # recomputes the pre-activation (one more forward launch) for GELU'
    dh = torch.randn(h.shape, generator=g).to(device, dt)
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, nw)]
    before = k["ln_conv1x1"]
    resfuse.layernorm_conv1x1(leaves[0], leaves[1], b1, norm_weight=leaves[2], norm_bias=nb, norm_eps=1e-6,
                              epilogue_gelu=True, backend="triton").backward(dh)
    assert k["ln_conv1x1"] == before + 2  # the forward and the backward's recompute
    l64 = [t.detach().double().requires_grad_(True) for t in (x, w1, nw)]
    resfuse.reference.layernorm_conv1x1_reference(l64[0], l64[1], b1.double(), l64[2], nb.double(), 1e-6,
                                                  True).backward(dh.double())
    le = [t.detach().requires_grad_(True) for t in (x, w1, nw)]
    resfuse.reference.layernorm_conv1x1_reference(le[0], le[1], b1, le[2], nb, 1e-6, True).backward(dh)
    for name, got, r, e in zip(("dx", "dw1", "d norm_weight"), leaves, l64, le):
        assert_matches(got.grad, r.grad, e.grad, dt, f"GELU-epilogue {name}", seed)


def test_horblock_mlp_splits_the_gelu_only_without_autograd(device, monkeypatch):
    """A fused HorBlock under no_grad puts the GELU in pwconv1's epilogue
    (pwconv2 without a prologue); with autograd recording it keeps the GELU
    as pwconv2's prologue. Both match the original."""
    k = kernels_module("conv1x1")
    calls = []
    real = k.ln_conv1x1_fwd

    def spy(*args, **kw):
        calls.append((bool(kw.get("epilogue_gelu")), bool(kw.get("prologue_gelu"))))
        return real(*args, **kw)
    monkeypatch.setattr(k, "ln_conv1x1_fwd", spy)
    plain = randomize(HorBlock(16, gnconv=partial(gnconv, order=3)), 5).eval().to(device)
    block = FusedHorBlock.from_module(copy.deepcopy(plain), backend="triton")
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        y = block(x)
    assert calls[-2:] == [(True, False), (False, False)], calls
    assert_matches(y, ref64, plain(x).detach(), torch.float32, "no_grad HorBlock")
    calls.clear()
    y = block(x.requires_grad_(True))
    assert calls[-2:] == [(False, False), (False, True)], calls
    y.sum().backward()
    assert_matches(y, ref64, plain(x).detach(), torch.float32, "grad HorBlock")
