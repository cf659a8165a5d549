"""resfuse.nn: ConvBNAct / FusedSequential as drop-ins for Conv2d ->
BatchNorm2d (-> ReLU).

Eval mode is compared with a float64 reference by the rule of
tests/numerics.py; train mode must be *exactly* what the plain modules
compute (outputs, running statistics, num_batches_tracked, gradients).
"""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse.nn import ConvBNAct, FusedSequential
from testutil import generator as _gen, launches as _launches
from numerics import assert_matches, rel_err
from seed_models import float64_reference, randomize_bn


def _plain(cin, cout, k, stride=1, padding=0, bias=False, act=True, momentum=0.1, dilation=1):
    mods = [nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias),
            nn.BatchNorm2d(cout, momentum=momentum)]
    return nn.Sequential(*(mods + [nn.ReLU()] if act else mods))


# ----------------------------------------------------------------------------
# construction and state_dict compatibility
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("activation,n_children", [("relu", 3), ("identity", 2), ("silu", 3)])
def test_constructor_is_a_drop_in_for_the_plain_sequential(activation, n_children):
    m = ConvBNAct(5, 7, 3, stride=2, padding=1, bias=True, activation=activation)
    plain = nn.Sequential(nn.Conv2d(5, 7, 3, 2, 1, bias=True), nn.BatchNorm2d(7),
                          *([nn.SiLU() if activation == "silu" else nn.ReLU()] if n_children == 3 else []))
    assert len(m) == n_children
    assert isinstance(m.conv, nn.Conv2d) and isinstance(m.bn, nn.BatchNorm2d)
    assert (m.act is None) == (n_children == 2)
    sd, psd = m.state_dict(), plain.state_dict()
    assert list(sd) == list(psd)
    assert all(sd[k].shape == psd[k].shape for k in sd)
    m.load_state_dict(psd, strict=True)
    plain.load_state_dict(m.state_dict(), strict=True)
    assert (m.conv.stride, m.conv.padding, m.conv.bias is not None) == ((2, 2), (1, 1), True)


def test_constructor_rejects_unknown_activation_and_backend():
    with pytest.raises(ValueError, match="activation"):
        ConvBNAct(3, 4, 3, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        ConvBNAct(3, 4, 3, backend="gpu")
    m = ConvBNAct(3, 4, 3)
    with pytest.raises(ValueError, match="backend"):
        m.backend = "CUDA"
    with pytest.raises(ValueError, match="backend"):
        m.backend = None
    assert m.backend == "auto"
    m.backend = "eager"
    assert m.backend == "eager" and "backend='eager'" in repr(m)


def test_from_modules_shares_the_modules():
    conv, bn, act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
    m = ConvBNAct.from_modules(conv, bn, act, backend="eager")
    assert m.conv is conv and m.bn is bn and m.act is act and m.backend == "eager"
    assert list(m.state_dict()) == list(nn.Sequential(conv, bn, act).state_dict())
    m2 = ConvBNAct.from_modules(conv, bn)
    assert len(m2) == 2 and m2.act is None


class _ConvWithOwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class _BNWithOwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("case,match", [
    ("conv1d", "Conv1d is not an nn.Conv2d"),
    ("conv_transpose", "ConvTranspose2d is not an nn.Conv2d"),
    ("conv_subclass", "overrides Conv2d.forward"),
    ("reflect", "padding_mode='reflect'"),
    ("same_even", "padding='same' is asymmetric"),
    ("bn_no_running_stats", "without running statistics"),
    ("bn_subclass", "overrides BatchNorm2d.forward"),
    ("bn1d", "followed by BatchNorm1d"),
    ("groupnorm", "followed by GroupNorm"),
    ("bn_none", "no BatchNorm2d follows"),
    ("features_mismatch", "BatchNorm has 5 features but the conv has 4 output channels"),
    ("elu", "activation ELU is not one the kernels fuse"),
    ("leaky_inf", "activation LeakyReLU"),
    ("conv_hook", "Conv2d has forward hooks"),
    ("bn_pre_hook", "BatchNorm2d has forward_pre hooks"),
])
def test_from_modules_rejects_what_cannot_fuse(case, match):
    conv, bn, act = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), None
    if case == "conv1d":
        conv = nn.Conv1d(3, 4, 3)
    elif case == "conv_transpose":
        conv = nn.ConvTranspose2d(3, 4, 3)
    elif case == "conv_subclass":
        conv = _ConvWithOwnForward(3, 4, 3)
    elif case == "reflect":
        conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    elif case == "same_even":
        conv = nn.Conv2d(3, 4, 4, padding="same")
    elif case == "bn_no_running_stats":
        bn = nn.BatchNorm2d(4, track_running_stats=False)
    elif case == "bn_subclass":
        bn = _BNWithOwnForward(4)
    elif case == "bn1d":
        bn = nn.BatchNorm1d(4)
    elif case == "groupnorm":
        bn = nn.GroupNorm(2, 4)
    elif case == "bn_none":
        bn = None
    elif case == "features_mismatch":
        bn = nn.BatchNorm2d(5)
    elif case == "elu":
        act = nn.ELU()
    elif case == "leaky_inf":
        act = nn.LeakyReLU(float("inf"))
    elif case == "conv_hook":
        conv.register_forward_hook(lambda *a: None)
    elif case == "bn_pre_hook":
        bn.register_forward_pre_hook(lambda *a: None)
    with pytest.raises(ValueError, match="cannot fuse") as info:
        ConvBNAct.from_modules(conv, bn, act)
    assert match in str(info.value)


def test_from_modules_accepts_frozen_batchnorm_and_matches(seed):
    torchvision = pytest.importorskip("torchvision")
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=True)
    bn = torchvision.ops.FrozenBatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    plain = nn.Sequential(conv, bn, nn.ReLU())
    fused = ConvBNAct.from_modules(conv, bn, nn.ReLU(), backend="eager")
    fused.train()  # FrozenBatchNorm2d always uses its statistics: fused even in train mode
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        out = fused(x)
        eager = plain(x)
    assert fused.last_decisions["0"].backend == "eager"
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "frozen BN", seed)


# ----------------------------------------------------------------------------
# train mode: exactly what the plain modules compute
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("act,bias", [(True, False), (False, True)])
def test_train_mode_is_exactly_the_plain_modules(seed, momentum, act, bias):
    plain = _plain(4, 6, 3, stride=2, padding=1, bias=bias, act=act, momentum=momentum)
    randomize_bn(plain, _gen(seed)).train()
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="eager").train()
    before = _launches()
    for step in range(3):
        x = torch.randn(3, 4, 9, 7) * (step + 1) + step
        xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp, yf = plain(xp), fused(xf)
        assert torch.equal(yp, yf), f"step {step}: output differs (seed {seed})"
        g = torch.randn_like(yp)
        yp.backward(g)
        yf.backward(g)
        assert torch.equal(xp.grad, xf.grad), f"step {step}: input grad differs (seed {seed})"
        for (n, p), (_, f) in zip(plain.named_parameters(), fused.named_parameters()):
            assert torch.equal(p.grad, f.grad), f"step {step}: grad of {n} differs (seed {seed})"
        for (n, p), (_, f) in zip(plain.named_buffers(), fused.named_buffers()):
            assert torch.equal(p, f), f"step {step}: buffer {n} differs (seed {seed})"
    assert int(fused.bn.num_batches_tracked) == int(plain[1].num_batches_tracked)
    assert fused.last_decisions == {} and _launches() == before  # nothing fused in train mode


def test_mixed_modes_fuse_only_the_eval_groups(seed):
    plain = nn.Sequential(*_plain(3, 5, 3, padding=1), *_plain(5, 4, 1))
    randomize_bn(plain, _gen(seed))
    fused = FusedSequential(*copy.deepcopy(plain), backend="eager")
    for m in (plain, fused):
        m.eval()
        m[4].train()  # the second BN uses batch statistics
    ref = copy.deepcopy(plain).double()  # same modes: BN 4 on batch statistics
    x = torch.randn(2, 3, 8, 8)
    before = fused[4].running_mean.clone()
    with torch.no_grad():
        yp, yf, y64 = plain(x), fused(x), ref(x.double())
    assert not torch.equal(fused[4].running_mean, before)  # batch statistics were folded in
    assert set(fused.last_decisions) == {"0"}
    # BN 4 saw the fused group's output, which is not bitwise eager's: its
    # batch statistics agree to rounding, and it did update them once.
    torch.testing.assert_close(fused[4].running_mean, plain[4].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused[4].running_var, plain[4].running_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(plain[4].num_batches_tracked, fused[4].num_batches_tracked)
    assert_matches(yf, y64, yp, torch.float32, "mixed modes", seed)


# ----------------------------------------------------------------------------
# eval mode: numerics against float64
# ----------------------------------------------------------------------------

_SHAPES = [
    # (N, C, H, W, K, k, stride, padding, dilation, bias, act)
    (1, 3, 13, 11, 7, 3, 2, 1, 1, False, True),
    (2, 5, 9, 10, 33, 3, 1, 2, 2, True, True),
    (3, 17, 5, 7, 4, 1, 2, 0, 1, True, False),
]


@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-k{s[4]}")
def test_eval_eager_matches_float64(seed, shape):
    N, C, H, W, K, k, stride, padding, dilation, bias, act = shape
    plain = randomize_bn(_plain(C, K, k, stride, padding, bias, act, dilation=dilation), _gen(seed))
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="eager").eval()
    x = torch.randn(N, C, H, W)
    with torch.no_grad():
        out, eager = fused(x), plain(x)
    assert fused.last_decisions["0"].backend == "eager"
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, "eager path", seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_eval_triton_matches_float64(seed, device, dtype, channels_last):
    N, C, H, W, K, k, stride, padding, dilation, bias, act = _SHAPES[0 if dtype == torch.float32 else 1]
    plain = randomize_bn(_plain(C, K, k, stride, padding, bias, act, dilation=dilation), _gen(seed))
    plain = plain.to(device=device, dtype=dtype)
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="triton").eval()
    x = torch.randn(N, C, H, W, device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    before = _launches()
    with torch.no_grad():
        out, eager = fused(x), plain(x)
    assert _launches() == before + 1 and fused.last_decisions["0"].backend == "triton"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output must keep the input's memory format"
    assert out.dtype == dtype
    assert_matches(out, float64_reference(plain, x), eager, dtype, "triton path", seed)


def test_eval_gradients_match_plain_eval(seed):
    """Fine-tuning with frozen (eval) BN goes through the fused op's backward."""
    plain = randomize_bn(_plain(4, 6, 3, stride=2, padding=1, bias=True), _gen(seed))
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="eager").eval()
    ref = copy.deepcopy(plain).double()
    x = torch.randn(2, 4, 9, 8)
    g = torch.randn(2, 6, 5, 4)
    outs = []
    for m, dt in ((fused, torch.float32), (plain, torch.float32), (ref, torch.float64)):
        xi = x.to(dt).clone().requires_grad_()
        m(xi).backward(g.to(dt))
        outs.append([xi.grad] + [p.grad for p in m.parameters()])
    assert fused.last_decisions["0"].backend == "eager"
    names = ["x"] + [n for n, _ in plain.named_parameters()]
    for name, got, eager, ref_g in zip(names, *outs):
        assert_matches(got, ref_g, eager, torch.float32, f"grad of {name}", seed)


def test_gradcheck_float64_eval():
    torch.manual_seed(0)
    plain = randomize_bn(_plain(2, 3, 3, stride=2, padding=1, bias=True), _gen(0)).double()
    fused = ConvBNAct.from_modules(*plain, backend="eager").eval()
    names = [n for n, _ in fused.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(fused, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), fast_mode=True)


# ----------------------------------------------------------------------------
# hooks, autocast, copies, backend selection
# ----------------------------------------------------------------------------

def test_hooks_on_a_member_still_fire(seed):
    """A fused group never calls conv.forward: with a hook on the conv it
    must run unfused, or the hook silently never fires."""
    plain = randomize_bn(_plain(3, 4, 3, padding=1), _gen(seed))
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="eager").eval()
    seen = []
    handle = fused.conv.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        out = fused(x)
        assert len(seen) == 1 and torch.equal(seen[0], plain[0](x))
        assert torch.equal(out, plain(x))  # unfused: the very same modules ran
        assert fused.last_decisions == {}
        handle.remove()
        fused(x)
    assert len(seen) == 1 and fused.last_decisions["0"].backend == "eager"


def test_autocast_bf16_cpu_matches_eager_autocast(seed):
    plain = randomize_bn(_plain(5, 8, 3, stride=2, padding=1, bias=True), _gen(seed))
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="eager").eval()
    x = torch.randn(2, 5, 11, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, eager = fused(x), plain(x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_matches(out, float64_reference(plain, x), eager, torch.bfloat16, "autocast bf16", seed)
    # float64 is not autocast-eligible: it stays float64, as in eager.
    x64 = x.double()
    fused64, plain64 = copy.deepcopy(fused).double(), copy.deepcopy(plain).double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out64, eager64 = fused64(x64), plain64(x64)
    assert out64.dtype == eager64.dtype == torch.float64
    assert rel_err(out64, eager64) < 1e-12, f"seed {seed}"


def test_deepcopy_and_pickle_keep_backend_and_output(seed):
    plain = randomize_bn(_plain(3, 4, 3, padding=1), _gen(seed))
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="eager").eval()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        out = fused(x)
    for clone in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert type(clone) is ConvBNAct and clone.backend == "eager"
        assert clone.conv is not fused.conv
        with torch.no_grad():
            assert torch.equal(clone(x), out)
        clone.bn.running_var.mul_(4)  # independent buffers
        assert not torch.equal(clone.bn.running_var, fused.bn.running_var)


def test_explicit_backend_that_cannot_run_raises_with_reasons():
    fused = ConvBNAct(3, 4, 3, backend="cuda").eval()
    with pytest.raises(resfuse.BackendUnavailable, match="'cuda'") as info:
        fused(torch.randn(1, 3, 5, 5))
    assert info.value.reasons
    fused.backend = "triton"
    with pytest.raises(resfuse.BackendUnavailable, match="float64"):
        fused.double()(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    grouped = FusedSequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4), backend="triton").eval()
    with pytest.raises(resfuse.BackendUnavailable, match="groups=2"):
        grouped(torch.randn(1, 4, 5, 5))


def test_auto_falls_back_visibly():
    grouped = FusedSequential(nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        grouped(torch.randn(1, 4, 5, 5))
    d = grouped.last_decisions["0"]
    assert d.backend == "eager" and d.fell_back
    assert "groups=2" in d.reason()


def test_resfuse_backend_env_var(monkeypatch):
    fused = ConvBNAct(3, 4, 3).eval()  # backend='auto'
    x = torch.randn(1, 3, 5, 5)
    monkeypatch.setenv("RESFUSE_BACKEND", "eager")
    with torch.no_grad():
        fused(x)
    assert fused.last_decisions["0"].backend == "eager"
    monkeypatch.setenv("RESFUSE_BACKEND", "cuda")
    with pytest.raises(resfuse.BackendUnavailable, match="'cuda'"):
        fused(x)
    monkeypatch.setenv("RESFUSE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RESFUSE_BACKEND"):
        fused(x)
    fused.backend = "eager"  # an explicit backend is not overridden by the variable
    monkeypatch.setenv("RESFUSE_BACKEND", "cuda")
    with torch.no_grad():
        fused(x)
    assert fused.last_decisions["0"].backend == "eager"


def test_last_decisions_cleared_when_what_runs_may_change():
    fused = ConvBNAct(3, 4, 3, backend="eager").eval()
    with torch.no_grad():
        fused(torch.randn(1, 3, 5, 5))
    assert fused.last_decisions
    fused.backend = "auto"
    assert fused.last_decisions == {}
    with torch.no_grad():
        fused(torch.randn(1, 3, 5, 5))
    fused.half()
    assert fused.last_decisions == {}


def test_global_module_hooks_disable_fusion(seed):
    fused = ConvBNAct(3, 4, 3, backend="eager").eval()
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    try:
        with torch.no_grad():
            fused(torch.randn(1, 3, 5, 5))
        assert fused.last_decisions == {}
        assert calls.count("Conv2d") == 1 and calls.count("BatchNorm2d") == 1
        with pytest.raises(ValueError, match="global module hooks"):
            ConvBNAct.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    finally:
        handle.remove()
    with torch.no_grad():
        fused(torch.randn(1, 3, 5, 5))
    assert fused.last_decisions["0"].backend == "eager"


def test_autocast_bf16_triton(seed, device):
    plain = randomize_bn(_plain(5, 8, 3, stride=2, padding=1, bias=True), _gen(seed)).to(device)
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend="triton").eval()
    x = torch.randn(2, 5, 11, 9, device=device)
    before = _launches()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        out, eager = fused(x), plain(x)
    assert _launches() == before + 1 and fused.last_decisions["0"].backend == "triton"
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_matches(out, float64_reference(plain, x), eager, torch.bfloat16, "autocast bf16 triton", seed)


@pytest.mark.parametrize("path", ["eager", "triton"])
def test_nan_and_inf_inputs_propagate_as_in_eager(seed, device, path):
    plain = randomize_bn(_plain(3, 5, 3, padding=1, bias=True), _gen(seed)).to(device)
    fused = ConvBNAct.from_modules(*copy.deepcopy(plain), backend=path).eval()
    x = torch.randn(2, 3, 9, 8, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 5, 5] = float("inf")
    x[1, 2, 0, 7] = -float("inf")
    with torch.no_grad():
        out, eager = fused(x), plain(x)
    assert fused.last_decisions["0"].backend == path
    assert torch.isnan(eager).sum() > 1  # the case is not vacuous
    assert_matches(out, float64_reference(plain, x), eager, torch.float32, f"NaN/Inf {path}", seed)
