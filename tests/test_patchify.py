"""Patchify convs with a channels-first LayerNorm (``patchify_conv``,
kernels/patchify.py, ``resfuse.nn.patchify``, ``recognize.patchify``):
HorNet's and ConvNeXt's stems (conv k=s -> LN) and downsampling layers
(LN -> conv k=s).

Kernel results against the float64 reference by GUIDE §3's rule
(tests/numerics.py), outputs NaN-poisoned, odd sizes (H, W not multiples
of the patch, channel counts off the tiles), both layouts, fp32/fp16/bf16;
each test proves the Triton kernel ran (launch counter, decision)."""

import copy
import pickle
import zlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse._backends import kernels_module
from resfuse.nn.patchify import PatchifyConv
from resfuse.reference import patchify_conv_reference

from numerics import assert_matches
from seed_hornet import HorLayerNorm, HorNet, randomize

DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _launches() -> int:
    """patchify_conv kernel launches so far (kernels/_common's counter)."""
    return kernels_module("_common").LAUNCHES_BY_KERNEL["patchify_conv"]


@dataclass(frozen=True)
class Case:
    N: int
    C: int
    H: int
    W: int
    K: int
    P: int
    pre: bool
    post: bool
    dtype: torch.dtype = torch.float32
    x_cl: bool = False
    w_cl: bool = False
    bias: bool = True
    offset: float = 1.0   # the input's mean (an LN_pre must remove it exactly)

    @property
    def name(self):
        return (f"n{self.N}c{self.C}h{self.H}w{self.W}k{self.K}p{self.P}" + ("-pre" if self.pre else "")
                + ("-post" if self.post else "") + f"-{DT[self.dtype]}" + ("-xcl" if self.x_cl else "")
                + ("-wcl" if self.w_cl else "") + ("" if self.bias else "-nobias") + f"-m{self.offset:g}")


def _inputs(c: Case, device):
    g = torch.Generator().manual_seed(zlib.crc32(c.name.encode()))

    def r(*s, scale=1.0):
        return torch.randn(*s, generator=g) * scale

    t = dict(x=r(c.N, c.C, c.H, c.W) + c.offset, weight=r(c.K, c.C, c.P, c.P, scale=(c.C * c.P * c.P) ** -0.5),
             bias=r(c.K) if c.bias else None,
             pre_weight=r(c.C, scale=0.5) + 1 if c.pre else None, pre_bias=r(c.C) if c.pre else None,
             pre_eps=1e-6 if c.pre else None,
             post_weight=r(c.K, scale=0.5) + 1 if c.post else None, post_bias=r(c.K) if c.post else None,
             post_eps=1e-5 if c.post else None)
    t = {k: v.to(device=device, dtype=c.dtype) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    if c.x_cl:
        t["x"] = t["x"].contiguous(memory_format=torch.channels_last)
    if c.w_cl:
        t["weight"] = t["weight"].contiguous(memory_format=torch.channels_last)
    return t


def _ref(t, to64=True):
    a = [t[k] for k in ("x", "weight", "bias", "pre_weight", "pre_bias", "pre_eps", "post_weight", "post_bias",
                        "post_eps")]
    if to64:
        a = [v.double() if isinstance(v, torch.Tensor) else v for v in a]
    return patchify_conv_reference(*a)


MATRIX = [
    Case(2, 20, 9, 11, 24, 2, True, False),                                   # HorNet downsample, odd H/W
    Case(1, 40, 8, 6, 80, 2, True, False, torch.float16, x_cl=True, w_cl=True),
    Case(2, 24, 7, 9, 48, 2, True, False, torch.bfloat16, x_cl=True, offset=50.0),  # |mean|/std = 50
    Case(2, 3, 17, 13, 20, 4, False, True),                                   # RGB stem (SMALL_C), odd H/W
    Case(1, 3, 16, 12, 24, 4, False, True, torch.bfloat16, x_cl=True, w_cl=True),
    Case(1, 3, 8, 8, 40, 4, False, True, torch.float16, bias=False),
    Case(1, 20, 8, 8, 24, 2, False, False, torch.float16, w_cl=True),          # no norm: flat tap loop
    Case(1, 20, 6, 10, 24, 3, True, True, x_cl=True),                          # both norms, P = 3
    Case(2, 17, 8, 8, 33, 2, True, False, torch.float16, offset=250.0, bias=False),  # fold cancellation, fp16
    Case(1, 7, 9, 10, 12, 3, False, False, x_cl=True),                          # SMALL_C, no norm, C*P = 21 > 16
]


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: c.name)
def test_patchify_matches_reference(case, device):
    t = _inputs(case, device)
    before = _launches()
    y = resfuse.patchify_conv(**t, backend="triton")
    assert resfuse.last_decision().backend == "triton"
    assert _launches() == before + 1
    assert_matches(y, _ref(t), _ref(t, to64=False), case.dtype, case.name)
    cl = case.x_cl or case.w_cl  # eager's layout rule for a conv's output
    assert y.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    e = resfuse.patchify_conv(**t, backend="eager")
    assert e.stride() == y.stride() and torch.equal(e, _ref(t, to64=False))


def test_layernorm_weight_scales_and_nonfinite(device):
    """Tiny LayerNorm weights in fp16 (the fold's per-row power-of-two
    scale keeps W' normal) and NaN / Inf spreading as eager's."""
    c = Case(1, 16, 6, 6, 32, 2, True, False, torch.float16)
    t = _inputs(c, device)
    t["pre_weight"] = t["pre_weight"] * 1e-5
    y = resfuse.patchify_conv(**t, backend="triton")
    assert_matches(y, _ref(t), _ref(t, to64=False), c.dtype, "lnw 1e-5")
    for case in (c, Case(1, 3, 8, 8, 16, 4, False, True)):
        t = _inputs(case, device)
        t["x"][0, 1, 2, 3] = float("nan")
        t["x"][0, 2, 5, 0] = float("inf")
        ref = _ref(t)
        assert torch.isnan(ref).any() and not torch.isnan(ref).all()
        assert_matches(resfuse.patchify_conv(**t, backend="triton"), ref, _ref(t, to64=False), case.dtype,
                       "nonfinite " + case.name)


@pytest.mark.parametrize("change,exc,text", [
    (dict(weight=torch.randn(8, 4, 2, 3)), ValueError, "square patchify conv weight"),
    (dict(weight=torch.randn(8, 5, 2, 2)), ValueError, "for x with 4 channels"),
    (dict(pre_weight=torch.ones(5)), ValueError, "pre_weight must have shape (4,)"),
    (dict(pre_eps=-1.0), ValueError, "pre_eps must be a non-negative float"),
    (dict(post_eps=None, post_weight=torch.ones(8)), ValueError, "post_weight/post_bias given without post_eps"),
    (dict(x=torch.randn(1, 4, 1, 6)), ValueError, "smaller than the 2x2 patch"),
    (dict(bias=torch.ones(8, dtype=torch.float16)), TypeError, "bias has dtype torch.float16"),
])
def test_bad_input_clear_error(change, exc, text):
    t = dict(x=torch.randn(1, 4, 6, 6), weight=torch.randn(8, 4, 2, 2), bias=None, pre_weight=torch.ones(4),
             pre_bias=None, pre_eps=1e-6, post_weight=None, post_bias=None, post_eps=None)
    t.update(change)
    with pytest.raises(exc, match=text.replace("(", r"\(").replace(")", r"\)")):
        resfuse.patchify_conv(**t, backend="eager")


def test_post_norm_too_wide_falls_back_with_reason(device):
    c = Case(1, 3, 8, 8, 260, 4, False, True)
    t = _inputs(c, device)
    y = resfuse.patchify_conv(**t, backend="auto")
    d = resfuse.last_decision()
    assert d.backend == "eager" and "260 > 256 channels" in d.reason(), d.reason()
    assert_matches(y, _ref(t), _ref(t, to64=False), c.dtype, "K=260")
    with pytest.raises(resfuse.BackendUnavailable, match="260 > 256"):
        resfuse.patchify_conv(**t, backend="triton")


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_opcheck_and_gradcheck(backend, device):
    c = Case(1, 4, 4, 6, 8, 2, True, True)
    t = _inputs(c, device)
    args = tuple(t[k] for k in ("x", "weight", "bias", "pre_weight", "pre_bias", "pre_eps", "post_weight",
                                "post_bias", "post_eps"))
    torch.library.opcheck(torch.ops.resfuse.patchify_conv.default, args + (backend,))
    if backend == "eager":
        a64 = [v.double().requires_grad_() if isinstance(v, torch.Tensor) else v for v in args]
        assert torch.autograd.gradcheck(lambda *a: torch.ops.resfuse.patchify_conv(*a, "eager"), a64,
                                        eps=1e-6, atol=1e-6, fast_mode=True)
        y = torch.ops.resfuse.patchify_conv(*a64, "eager")
        with pytest.raises(RuntimeError, match="double backward through patchify_conv"):
            torch.autograd.grad(y.square().sum(), a64[0], create_graph=True)


# ----------------------------------------------------------------------------
# Modules and convert
# ----------------------------------------------------------------------------

def _hornet(seed):
    return randomize(HorNet(0, 3, [1, 1, 1, 1], 8), seed).eval()


def test_convert_fuses_hornet_stem_and_downsampling(device):
    model = _hornet(3).to(device)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    conv = resfuse.convert(model, backend="triton", channels_last_weights=True)  # the layout convert gives on CUDA
    pcs = [m for m in conv.modules() if isinstance(m, PatchifyConv)]
    assert [m.kind for m in pcs] == ["conv4x4/4+ln", "ln+conv2x2/2", "ln+conv2x2/2", "ln+conv2x2/2"]
    sd = conv.state_dict()
    assert list(sd) == list(keys) and all(torch.equal(sd[k], v) for k, v in keys.items())
    x0 = x = torch.randn(1, 3, 32, 40, device=device)   # NCHW in: channels_last after the stem
    for index in (0, 1):
        model.index = conv.index = index
        before = _launches()
        with torch.no_grad():
            out = conv(x)
            ref, eager = model.double()(x.double()), model.float()(x)
        assert _launches() == before + 1
        assert_matches(out, ref, eager, torch.float32, f"stage {index}")
        assert out.is_contiguous(memory_format=torch.channels_last)
        x = eager
    rows = {r.name: r for r in resfuse.explain(conv)}
    assert rows["downsample_layers.0.0"].kind == "conv4x4/4+ln (patchify)"
    assert rows["downsample_layers.1.1"].kind == "ln+conv2x2/2 (patchify)"
    assert rows["downsample_layers.1.1"].backend == "triton"
    plain = {r.name: r.reason for r in resfuse.explain(model)}
    assert "fusable LayerNorm + patchify conv, but not converted" in plain["downsample_layers.1.1"]
    # pickling and deepcopy keep the fusion (classes made on demand)
    conv.index = 0
    for other in (pickle.loads(pickle.dumps(conv)), copy.deepcopy(conv)):
        assert isinstance(other.downsample_layers[0][0], PatchifyConv)
        with torch.no_grad():
            assert torch.equal(other(x0), conv(x0))


class UnbiasedLN(HorLayerNorm):
    """A LayerNorm look-alike (same attributes) with the unbiased variance."""

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(x.var(1, keepdim=True) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class TwoUses(nn.Module):
    """LN's output feeds the conv and a second path: the LN must stay."""

    def __init__(self):
        super().__init__()
        self.norm = HorLayerNorm(8, data_format="channels_first")
        self.conv = nn.Conv2d(8, 16, 2, 2)

    def forward(self, x):
        h = self.norm(x)
        return self.conv(h) + h[:, :1, ::2, ::2]


def test_recognition_by_what_modules_compute():
    ds = nn.Sequential(UnbiasedLN(8, data_format="channels_first"), nn.Conv2d(8, 16, 2, 2))
    kept = resfuse.convert(ds, backend="eager")
    assert type(kept[1]) is nn.Conv2d and type(kept[0]) is UnbiasedLN
    padded = resfuse.convert(nn.Sequential(HorLayerNorm(8, data_format="channels_first"),
                                           nn.Conv2d(8, 16, 2, 2, padding=1)), backend="eager")
    assert type(padded[1]) is nn.Conv2d
    two = resfuse.convert(TwoUses(), backend="eager")
    assert type(two.conv) is nn.Conv2d and type(two.norm) is HorLayerNorm
    x = torch.randn(1, 8, 6, 6)
    m = TwoUses().eval()
    with torch.no_grad():
        assert torch.equal(resfuse.convert(m, backend="eager")(x), m(x))


def test_a_layernorm_between_two_patchify_convs_is_applied_once():
    """conv k=s -> LN -> conv k=s: the LayerNorm goes to one conv (the first,
    as its post-norm); the second runs without it (a LayerNorm applied
    twice would be a wrong answer)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 2, 2), HorLayerNorm(8, data_format="channels_first"),
                          nn.Conv2d(8, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU()).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    conv = resfuse.convert(model, backend="eager")
    assert conv[0].kind == "conv2x2/2+ln" and not isinstance(conv[2], PatchifyConv)
    x = torch.randn(2, 3, 16, 12)
    with torch.no_grad():
        assert_matches(conv(x), copy.deepcopy(model).double()(x.double()), model(x), torch.float32, "conv-LN-conv")
    with pytest.raises(ValueError, match="already applied by another patchify conv"):
        resfuse.nn.patchify.fuse_patchify(nn.Conv2d(8, 16, 2, 2), pre_norm=conv[1])


def test_hooks_train_mode_and_autocast():
    """A hook on the LayerNorm runs it as itself (and the conv plain);
    train-mode gradients are eager's; autocast returns eager's dtypes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 4, 4), HorLayerNorm(16, data_format="channels_first"),
                          HorLayerNorm(16, data_format="channels_first"), nn.Conv2d(16, 32, 2, 2))
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    conv = resfuse.convert(model, backend="eager")
    assert isinstance(conv[0], PatchifyConv) and isinstance(conv[3], PatchifyConv)
    x = torch.randn(2, 3, 16, 16)
    seen = []
    h = conv[1].register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        assert torch.allclose(conv(x), model(x), atol=1e-5)
    assert len(seen) == 1 and not conv[0].fuses_now
    h.remove()
    assert conv[0].fuses_now
    conv.train()
    xg = x.clone().requires_grad_()
    conv(xg).square().sum().backward()
    xe = x.clone().requires_grad_()
    model(xe).square().sum().backward()
    assert torch.allclose(xg.grad, xe.grad, atol=1e-4, rtol=1e-4)
    for (n, p), q in zip(conv.named_parameters(), model.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), n
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv[0](x).dtype == model[1](model[0](x)).dtype == torch.float32
        h1 = model[1](model[0](x))
        assert conv[3](conv[2](h1)).dtype == model[3](model[2](h1)).dtype == torch.bfloat16


def test_convnext_stems_and_downsampling_convert():
    """torchvision's and timm's ConvNeXt: LayerNorm2d (permute +
    F.layer_norm) in the stem and the 3 downsampling layers."""
    import torchvision
    timm = pytest.importorskip("timm")
    for model in (torchvision.models.convnext_tiny(weights=None),
                  timm.create_model("convnext_atto", pretrained=False)):
        model.eval()
        conv = resfuse.convert(model, backend="eager")
        kinds = [m.kind for m in conv.modules() if isinstance(m, PatchifyConv)]
        assert kinds == ["conv4x4/4+ln"] + ["ln+conv2x2/2"] * 3, (type(model).__name__, kinds)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            ref, eager, out = copy.deepcopy(model).double()(x.double()), model(x), conv(x)
        assert_matches(out, ref, eager, torch.float32, type(model).__name__)


def test_torch_compile_fullgraph(device):
    torch.manual_seed(1)
    model = nn.Sequential(HorLayerNorm(8, data_format="channels_first"), nn.Conv2d(8, 16, 2, 2)).to(device).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    fused = resfuse.convert(model, backend="triton")
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 8, 6, 10, device=device)
    before = _launches()
    with torch.no_grad():
        y = compiled(x)
        ref, eager = copy.deepcopy(model).double()(x.double()), model(x)
    assert _launches() > before
    assert_matches(y, ref, eager, torch.float32, "compiled")
