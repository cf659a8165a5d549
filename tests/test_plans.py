"""The host path (resfuse/ops/plans.py): plans cached per signature, the
direct (inference) call path, and what CUDA graph capture needs of a
second forward. CPU tests; the capture tests themselves are `gpu`."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import resfuse
from resfuse._backends import kernels_module
from resfuse.ops import conv_bn_act as conv_op
from resfuse.ops import plans
from numerics import assert_matches


def _bn(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, generator=g), torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g),
            torch.randn(k, generator=g))


def _ref(x, w, mean, var, gamma, beta, pad=1):
    d = [t.double() for t in (x, w, mean, var, gamma, beta)]
    return F.relu(F.batch_norm(F.conv2d(d[0], d[1], None, 1, pad), d[2], d[3], d[4], d[5], False, 0.0, 1e-5))


def _eager(x, w, bn):
    return F.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), *bn, False, 0.0, 1e-5))


def _call(x, w, bn, backend):
    m, v, g, b = bn
    return resfuse.conv_bn_act(x, w, bn_mean=m, bn_var=v, bn_weight=g, bn_bias=b, padding=1, activation="relu",
                               backend=backend)


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_aligned_and_offset_views_get_their_own_plans(backend):
    """A plan made for a 16-byte aligned x is never used for an offset view
    of the same shape and strides (Triton specialises on pointer
    alignment): alternating the two gives two plans, both correct."""
    torch.manual_seed(0)
    shape = (1, 5, 6, 7)
    n = 5 * 6 * 7
    buf = torch.randn(n + 1)
    aligned, offset = buf[:n].view(shape), buf[1:].view(shape)
    assert aligned.data_ptr() % 16 == 0 and offset.data_ptr() % 16 == 4
    assert aligned.stride() == offset.stride()
    w = torch.randn(3, 5, 3, 3)
    bn = _bn(3)
    conv_op._PLANS.plans.clear()
    with torch.no_grad():
        for _ in range(2):
            for x in (aligned, offset, aligned):
                y = _call(x, w, bn, backend)
                assert_matches(y, _ref(x, w, *bn), _eager(x, w, bn), torch.float32, backend)
    keys = list(conv_op._PLANS.plans)
    assert len(keys) == 2, keys
    assert {k[0][0][4] for k in keys} == {0, 4}  # x's alignment is what tells them apart


def test_cached_triton_plans_of_every_conv_op_compute_new_data_right():
    """The second call of a signature runs the cached plan from its
    arguments (``triton_conv``, no validation, no problem object): for the
    plain, projection and prologue ops alike, on new input data, against
    float64 (outputs are poisoned by the suite), with the Triton kernels
    really running (the interpreter here)."""
    from resfuse._backends import interpreting
    from resfuse.models import randomize_bn
    import torchvision
    if not interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1) on CPU")
    torch.manual_seed(4)
    down = nn.Sequential(nn.Conv2d(6, 12, 1, 2, bias=False), nn.BatchNorm2d(12))
    plain = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        torchvision.models.resnet.Bottleneck(6, 3, 2, downsample=down),
        nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 5, 3, padding=1)))).eval()
    fused = resfuse.convert(plain, backend="triton")
    from resfuse.ops import bn_act_conv as pre_op, conv_bn_proj_act as proj_op
    caches = (conv_op._PLANS, proj_op._PLANS, pre_op._PLANS)
    ref = copy.deepcopy(plain).double()
    with torch.no_grad():
        for i in range(3):
            x = torch.randn(2, 3, 7, 9)
            y = fused(x)
            assert_matches(y, ref(x.double()), plain(x), torch.float32, f"call {i}")
            if i == 0:
                sizes = [len(c.plans) for c in caches]
                assert all(sizes), sizes  # each op made its plan
    assert [len(c.plans) for c in caches] == sizes  # later calls hit them
    decisions = list(fused[3].last_decisions.values()) + [fused[4][2].last_decision]
    assert all(d.backend == "triton" for d in decisions), decisions


def test_a_plan_never_outlives_the_metadata_it_was_made_for():
    """Shapes, dtypes and devices are part of the key: a call that differs
    in any of them is validated afresh (a bad one raises its own error),
    including a weight whose .data was replaced after the first call."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 5, 5)
    w = nn.Parameter(torch.randn(6, 4, 3, 3))
    bn = _bn(6)
    with torch.no_grad():
        assert_matches(_call(x, w, bn, "eager"), _ref(x, w, *bn), _eager(x, w, bn), torch.float32, "first")
        with pytest.raises(ValueError, match="channels"):
            _call(torch.randn(2, 3, 5, 5), w, bn, "eager")
        with pytest.raises(TypeError, match="dtype"):
            _call(x, w.double(), bn, "eager")
        w.data = torch.randn(3, 4, 3, 3)  # same Parameter object, other shape
        with pytest.raises(ValueError, match="bn_mean must have shape"):
            _call(x, w, bn, "eager")
        bn3 = _bn(3, seed=1)
        y = _call(x, w, bn3, "eager")
        assert y.shape == (2, 3, 5, 5)
        assert_matches(y, _ref(x, w, *bn3), _eager(x, w, bn3), torch.float32, "after .data")


def test_gnconv_and_patchify_ops_validate_once_per_signature(monkeypatch):
    """layernorm_conv1x1, gnconv_chain, gelu_conv1x1 and patchify_conv
    validate a signature's first call only; a call that differs in
    metadata (a weight's .data replaced) is validated afresh and raises."""
    from resfuse.ops import gnconv as gn_op, horblock_mlp, patchify as pf_op
    counts = {}
    for mod, name in ((gn_op, "make_ln_conv1x1_problem"), (gn_op, "make_chain_problem"),
                      (horblock_mlp, "make_gelu_conv1x1_problem"), (pf_op, "make_patchify_problem")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _r=real, _n=name: (counts.__setitem__(_n, counts.get(_n, 0) + 1),
                                                                     _r(*a))[1])
    torch.manual_seed(2)
    x = torch.randn(1, 6, 4, 4)
    w1 = nn.Parameter(torch.randn(5, 6, 1, 1))
    nw, nb = torch.randn(6), torch.randn(6)
    a = torch.randn(1, 8, 4, 4)
    w2 = torch.randn(3, 8, 1, 1)
    wp = torch.randn(4, 6, 2, 2)
    with torch.no_grad():
        for _ in range(3):
            y1 = resfuse.layernorm_conv1x1(x, w1, norm_weight=nw, norm_bias=nb, norm_eps=1e-6, backend="eager")
            y2 = resfuse.gelu_conv1x1(a, w2, backend="eager")
            y3 = resfuse.patchify_conv(x, wp, pre_weight=nw, pre_bias=nb, pre_eps=1e-6, backend="eager")
    assert y1.shape == (1, 5, 4, 4) and y2.shape == (1, 3, 4, 4) and y3.shape == (1, 4, 2, 2)
    assert counts == {"make_ln_conv1x1_problem": 1, "make_gelu_conv1x1_problem": 1, "make_patchify_problem": 1}
    w1.data = torch.randn(5, 7, 1, 1)  # same Parameter, a shape the op must refuse
    with torch.no_grad(), pytest.raises(ValueError, match="weight"):
        resfuse.layernorm_conv1x1(x, w1, norm_weight=nw, norm_bias=nb, norm_eps=1e-6, backend="eager")
    assert counts["make_ln_conv1x1_problem"] == 2


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_direct_path_only_where_nothing_needs_the_op():
    """No gradient to record, no mode, no tracing, plain tensors: the
    implementation is called directly. Otherwise the call goes through
    torch.ops.resfuse (a dispatch mode sees the op; autograd records it)."""
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
    p = nn.Parameter(torch.randn(2, 2, 1, 1))
    assert plans.direct_call_ok(x, w, None)
    assert not plans.direct_call_ok(x, p)           # grad mode on, a parameter
    with torch.no_grad():
        assert plans.direct_call_ok(x, p)
        with _OpLog():
            assert not plans.direct_call_ok(x, w)
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode:
            assert not plans.direct_call_ok(mode.from_tensor(x))
        assert not torch.vmap(lambda t: torch.tensor(plans.direct_call_ok(t)))(x[None]).item()

    class Sub(torch.Tensor):
        pass

    assert not plans.direct_call_ok(x.as_subclass(Sub))
    seen = []
    torch.jit.trace(lambda t: (seen.append(plans.direct_call_ok(t)), t + 1)[1], (x,), check_trace=False)
    assert seen == [False]

    # through the module path: the op is what a mode sees, and what autograd differentiates
    seq = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU()).eval()
    fused = resfuse.convert(seq, backend="eager")
    with torch.no_grad(), _OpLog() as log:
        fused(x)
    assert "resfuse.conv_bn_act.default" in log.ops and "aten.convolution.default" not in log.ops, log.ops
    xg = x.clone().requires_grad_(True)
    fused(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    seq(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    assert fused(xg).grad_fn is not None


def test_the_conv_launch_is_prepared_once_per_signature(monkeypatch):
    """Recorded launches (sm_90 target): the launcher prepares a launch
    once per plan (aligned and offset x are two), later calls reuse it with
    their own tensors, and a reused launch has exactly the scalars, flags
    and config a fresh preparation gives."""
    common, kern = kernels_module("_common"), kernels_module("conv_bn_act")
    prepared = []
    orig = kern.prepare
    monkeypatch.setattr(kern, "prepare", lambda *a, **k: prepared.append(a[0]) or orig(*a, **k))
    n = 8 * 5 * 5
    buf = torch.randn(n + 1)
    aligned, offset = buf[:n].view(1, 8, 5, 5), buf[1:].view(1, 8, 5, 5)
    w = torch.randn(8, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    bn = _bn(8)
    launches = []
    conv_op._PLANS.plans.clear()
    common.start_recording(launches.append, 132)
    try:
        with torch.no_grad():
            for x in (aligned, offset, aligned, offset):
                _call(x, w, bn, "triton")
            fresh = []
            common.stop_recording()
            common.start_recording(fresh.append, 132)
            kern.conv_bn_act_fwd(launches[2].args[0], w, None, *bn, 1e-5, None, (1, 1), (1, 1), (1, 1), 1, 0.01,
                                 launches[2].args[8], allow_tf32=False)
    finally:
        common.stop_recording()
    assert len(prepared) == 3 and len(launches) == 4  # aligned, offset, then the fresh one below
    for a, b in ((launches[0], launches[2]), (launches[1], launches[3]), (fresh[0], launches[2])):
        assert a.fn is b.fn and a.kwargs == b.kwargs and a.config is b.config and a.tune_key == b.tune_key
        assert all(u == v for u, v in zip(a.args, b.args) if not isinstance(u, torch.Tensor))
    assert launches[2].args[8] is not launches[0].args[8]  # a fresh output per call


def test_a_new_signature_during_capture_raises_before_compiling(monkeypatch):
    """While the stream is capturing (simulated), a signature with a plan
    runs; a new one on the Triton backend raises CaptureError, and nothing
    is planned or launched."""
    common = kernels_module("_common")
    seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    fused = resfuse.convert(seq, backend="triton")
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        y0 = fused(x)
        monkeypatch.setattr(plans, "_capturing", lambda: True)
        torch.testing.assert_close(fused(x), y0)
        before = common.LAUNCHES_BY_KERNEL["conv_bn_act"]
        n_plans = len(conv_op._PLANS.plans)
        with pytest.raises(plans.CaptureError, match="CUDA graph is being captured"):
            fused(torch.randn(2, 3, 5, 5))
        assert common.LAUNCHES_BY_KERNEL["conv_bn_act"] == before and len(conv_op._PLANS.plans) == n_plans
        eager = resfuse.convert(seq, backend="eager")
        eager(torch.randn(2, 3, 5, 5))  # eager ops capture as they are: no error


# ops that read a tensor's value on the host (a sync on CUDA)
_HOST_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::equal", "aten::is_nonzero",
              "aten::cpu", "aten::tolist"}


@pytest.mark.parametrize("arch", ["resnet18", "hornet"])
def test_second_forward_needs_no_host_sync_compile_or_tuning(arch, monkeypatch):
    """What capture would break on: with launches stubbed (recorded for
    sm_90), the second forward of a converted model reads no tensor value
    on the host, copies nothing across devices, makes no new plan and asks
    no tuned kernel for a config it has not chosen before."""
    from resfuse.models import randomize_bn, resnet18
    from resfuse.hornet import HorBlock
    torch.manual_seed(2)
    if arch == "resnet18":
        plain = randomize_bn(resnet18(width=8, num_classes=10)).eval()
    else:
        plain = nn.Sequential(HorBlock(16), HorBlock(16)).eval()
    x = torch.randn(1, 3, 32, 32) if arch == "resnet18" else torch.randn(1, 16, 8, 8)
    common = kernels_module("_common")
    launches = []
    common.start_recording(launches.append, 132)
    try:
        fused = resfuse.convert(plain, backend="triton", channels_last_weights=True)
        with torch.no_grad():
            fused(x)
            first = len(launches)
            assert first > 0
            plans_before = {id(c): len(c.plans) for c in plans._CACHES}
            chosen = []
            orig = common.TunedKernel.candidates
            monkeypatch.setattr(common.TunedKernel, "candidates",
                                lambda self, *a, **k: chosen.append(self.name) or orig(self, *a, **k))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        record_shapes=True) as prof:
                fused(x)
    finally:
        common.stop_recording()
    assert len(launches) == 2 * first
    events = prof.events()
    assert not {e.name for e in events} & _HOST_SYNC, sorted({e.name for e in events} & _HOST_SYNC)
    # a tensor copied by .to() (dtype or device); eager's own wrapping of a
    # Python scalar into a 0-d tensor (avgpool's mean) is not one
    copies = [e.input_shapes for e in events if e.name == "aten::_to_copy" and e.input_shapes[0]]
    assert not copies, copies
    assert {id(c): len(c.plans) for c in plans._CACHES} == plans_before
    assert chosen == []


def _capture_case(batch):
    """A converted ResNet-18 (width 16) on the GPU, an input of `batch`,
    its float64 reference and the fp32 eager output the rule scales from."""
    from resfuse.models import randomize_bn, resnet18
    torch.manual_seed(3)
    plain = randomize_bn(resnet18(width=16, num_classes=10)).eval().cuda()
    x = torch.randn(batch, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref, eager = copy.deepcopy(plain).double()(x.double()), plain(x)
    return plain, resfuse.convert(plain, backend="triton"), x, ref, eager


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay_with_new_input():
    plain, fused, static_x, _, _ = _capture_case(8)
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fused(static_x)   # compile, plan, warm up outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = fused(static_x)
        for seed in range(3):
            torch.manual_seed(10 + seed)
            static_x.copy_(torch.randn_like(static_x))
            g.replay()
            ref = copy.deepcopy(plain).double()(static_x.double())
            assert_matches(static_y, ref, plain(static_x), torch.float32, f"replay {seed}")


@pytest.mark.gpu
def test_make_graphed_callables():
    _, fused, x, ref, eager = _capture_case(1)
    graphed = torch.cuda.make_graphed_callables(fused, (x,))  # forward and backward graphs; replaces its forward
    assert_matches(graphed(x).detach(), ref, eager, torch.float32, "make_graphed_callables")


@pytest.mark.gpu
def test_compile_reduce_overhead_fullgraph():
    _, fused, x, ref, eager = _capture_case(1)
    compiled = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            y = compiled(x)
    assert_matches(y, ref, eager, torch.float32, "reduce-overhead")
