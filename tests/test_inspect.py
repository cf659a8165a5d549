"""The Hopper rules, enforced on the compiled code (no GPU): every kernel
variant a converted torchvision resnet50() (as constructed: OIHW weights)
launches, for NCHW and channels_last input, bf16 and fp16, batch 1 and 64,
compiles for sm_90 to wgmma (HGMMA) with both operands by 16-byte async
copies, loads overlapping the MMA, and no spills (the 3-channel stem is
exempt from the operand rules: its rows are 6 bytes). Plus the tool's
negative controls, the no-spill rule for the whole conv config space, and
the first-call compile count. Compiles are cached on disk
(RESFUSE_INSPECT_CACHE; one compile per specialization class per run).

HorNet-T (``python -m resfuse.inspect --model hornet_t``): every conv runs
on Triton and every variant meets the same rules (the 3-channel patchify
stem exempt as ResNet-50's is): the LayerNorm / GELU 1x1 GEMMs, the
LayerNorm + patchify downsampling convs, and the gnconv chain, whose
persistent loop runs one GEMM reduction per stage: each pipelines, or
(the first, FIRST_IN_REGS) has resident operands and loads nothing.
bench/results/2026-12-03-inspect-sm90.md.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchvision")
triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("TRITON_INTERPRET") == "1":
    # triton.jit fixed interpreter mode when the kernels were imported, and
    # the AOT compile needs real JIT functions: run this file in a child
    # process without the interpreter.
    def test_inspect_checks_in_a_child_process():
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        print(r.stdout[-6000:])
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]
else:
    from resfuse import inspect as ri
    from resfuse._backends import kernels_module

    ri._cuobjdump()  # the wheel's cuobjdump: a clear error if it is missing

    STEM = "3->64 7x7/2"


    def _resnet50():
        import torchvision
        torch.manual_seed(0)
        return torchvision.models.resnet50(weights=None)


    class NoEagerConv(torch.utils._python_dispatch.TorchDispatchMode):
        """Appends every eager convolution dispatched while active to `seen`."""

        def __init__(self, seen):
            super().__init__()
            self.seen = seen

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.convolution.default, torch.ops.aten.cudnn_convolution.default):
                self.seen.append(func)
            return func(*args, **(kwargs or {}))


    def _recorded(model, dtype, layout, batch, image=224, channels_last_weights=True, repacks=None):
        x = ri.model_input("resnet50", batch, image, dtype, layout)
        seen = []
        with NoEagerConv(seen):
            launches = ri.record_model(model, x, channels_last_weights=channels_last_weights, repacks=repacks)
        assert not seen, "an eager convolution ran in the converted model"
        return launches


    @pytest.mark.parametrize("dtype,layout,batch,clw", [
        (torch.bfloat16, "channels_last", 64, True), (torch.bfloat16, "nchw", 1, True),
        (torch.float16, "nchw", 64, True), (torch.float16, "channels_last", 1, True),
        (torch.bfloat16, "channels_last", 64, False)], ids=str)
    def test_resnet50_variants_are_hopper_ready(dtype, layout, batch, clw):
        """The default convert (weights laid out channels_last once): a
        channels_last input is copied nowhere, an NCHW input once, at the
        stem (eager's layout rule then keeps every activation
        channels_last). ``channels_last_weights=False`` keeps the OIHW
        weights: the launcher repacks them at every call (17 copies) and the
        kernels are the same."""
        model = _resnet50()
        repacks = {}
        launches = _recorded(model, dtype, layout, batch, channels_last_weights=clw, repacks=repacks)
        assert repacks == ({"x": 1} if layout == "nchw" else {} if clw else {"weight": 17}), repacks
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        # every conv is a launch, the 4 projection shortcuts inside their block's last kernel
        assert len(launches) == len(convs) - 4 == 49
        mr = ri.inspect_launches(launches)
        assert sum(r.launches for r in mr.variants) == 49
        assert sum("+proj" in p for r in mr.variants for p in r.problems) >= 1
        for r in mr.variants:
            assert r.mma == "HGMMA" and r.spill_bytes == 0, r
            if r.problems == [STEM]:
                continue
            assert r.loop_sync_loads == 0 and r.loop_async_narrow == 0 and r.loop_async_16b > 0, r
            assert r.overlap and min(r.wgmma_waits) >= 1 and min(r.cp_async_waits) >= 1, r
            assert r.layout == "x:C-inner w:C-inner y:C-inner", r
            assert r.flags == [], r
        # a first forward compiles once per variant and times nothing
        assert mr.first_forward_compiles == len(mr.variants)


    HORNET_STEM = "C=3 K=64"


    @pytest.mark.parametrize("dtype,layout,batch", [(torch.bfloat16, "channels_last", 64),
                                                    (torch.float16, "nchw", 1)], ids=str)
    def test_hornet_t_variants(dtype, layout, batch):
        """Every conv of HorNet-T on Triton (no eager convolution): the stem
        (4x4/4 conv + LayerNorm) and the 3 downsampling layers (LayerNorm +
        2x2/2 conv) as patchify_conv, per HorBlock the LayerNorm folds (no
        MMA), norm1 + proj_in and norm2 + pwconv1 (+ GELU epilogue) and
        pwconv2 as plain pipelined GEMMs, the chain (wgmma at every stage
        size). An NCHW input is laid out channels_last by the stem (its
        weight is), so both layouts give the same kernels after it. The
        3-channel stem is exempt from the operand rules (6-byte pixels, as
        ResNet-50's); the chain overlaps per reduction (module docstring)."""
        torch.manual_seed(0)
        model = ri.build_model("hornet_t")
        x = ri.model_input("hornet_t", batch, 224, dtype, layout)
        seen = []
        repacks = {}
        with NoEagerConv(seen):
            launches = ri.record_model(model, x, repacks=repacks)
        assert not seen, "an eager convolution ran in the converted HorNet-T"
        assert repacks == {}, repacks
        names = [ln.name for ln in launches]
        assert names.count("gnconv_chain") == 25 and names.count("ln_conv1x1") == 75
        assert names.count("patchify_conv") == 4
        assert names.count("ln_fold_weight") == 50 + 3  # + the 3 downsampling layers' LayerNorms
        mr = ri.inspect_launches(launches)
        for r in mr.variants:
            assert r.spill_bytes == 0, r
            if r.name == "ln_fold_weight":
                assert r.mma == "none" and set(r.load_widths) == {"16B"}, r
                continue
            assert r.mma == "HGMMA", r
            if r.problems == [HORNET_STEM]:
                continue
            assert r.loop_async_16b > 0 and r.loop_async_narrow == 0, r
            # copies in flight across the MMA (the chain: within each K sequence; its last step drains)
            assert r.cp_async_waits and max(r.cp_async_waits) >= 1, r
            if r.name in ("ln_conv1x1", "patchify_conv"):
                assert r.loop_sync_loads == 0 and r.overlap and min(r.wgmma_waits) >= 1 and r.flags == [], r
                assert min(r.cp_async_waits) >= 1, r
                assert r.layout == "x:C-inner w:C-inner y:C-inner", r
            if r.name == "gnconv_chain":
                # a persistent loop of `order` reductions, each drained before its gate / epilogue: the
                # first (x_0 and W_0 resident, FIRST_IN_REGS) loads nothing, every other one pipelines
                assert len(r.reduction_steps) >= 2 and r.reduction_steps[0] == "1 (resident)", r
                assert r.overlap and r.one_step_reductions == 0 and r.flags == [], r
        assert sum(r.problems == [HORNET_STEM] for r in mr.variants) == 1
        assert mr.first_forward_compiles == len(mr.variants)


    def test_no_patchify_config_spills():
        """Every config of the patchify kernel's space compiles for sm_90 to
        wgmma without spills, with the LayerNorm prologue (HorNet-T's first
        downsampling layer, bf16)."""
        from resfuse.hornet import HorLayerNorm
        k = kernels_module("patchify")
        m = torch.nn.Sequential(HorLayerNorm(64, data_format="channels_first"), torch.nn.Conv2d(64, 128, 2, 2))
        x = torch.randn(4, 64, 56, 56).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        ln = [ln for ln in ri.record_model(m, x) if ln.name == "patchify_conv"][0]
        kept = k._patchify_tuned.candidates(k._patchify_tuned.named_args(ln.args, ln.kwargs))
        assert len(kept) == len(k._patchify_configs()), kept
        for cfg in kept:
            r = ri.inspect_variant(ri.specialize(ln, **cfg.all_kwargs()))
            assert r.spill_bytes == 0 and r.mma == "HGMMA" and r.overlap, (cfg, r)


    def test_batch_sizes_share_variants():
        """Batch 64 and 96 (both fill the GPU) compile the same variants; the
        variant set depends on the batch only through Triton's int
        specialization and the wave rule of the default config."""
        model = _resnet50()
        keys = []
        for batch in (64, 96):
            launches = _recorded(model, torch.bfloat16, "channels_last", batch, image=224)
            keys.append({ri.specialize(ln).key("sm_90") for ln in launches})
        assert keys[0] == keys[1]


    def _conv_launch(weight_layout=torch.channels_last, projection=False, C=256, K=256, R=3, prologue=False):
        k = kernels_module("conv_bn_act")
        x = torch.randn(64, C, 14, 14).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(K, C, R, R).to(torch.bfloat16).contiguous(memory_format=weight_layout)
        m, v = torch.zeros(K), torch.ones(K)
        out = torch.empty(64, K, 14, 14, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        wd = torch.randn(K, C, 1, 1).to(torch.bfloat16)
        proj = (x, wd, None, m, v, None, None, 1e-5, (1, 1)) if projection else None
        pre = (torch.zeros(C), torch.ones(C), None, None, 1e-5, 1, 0.0) if prologue else None
        return ri.record(lambda: k.conv_bn_act_fwd(x, w, None, m, v, None, None, 1e-5, None, [1, 1], [R // 2] * 2,
                                                   [1, 1], 1, 0.01, out, allow_tf32=False, projection=proj,
                                                   prologue=pre))[0]


    def _sass(*instrs):
        return ri._sass_lines("\n".join(f"        /*{16 * i:04x}*/   {ins} ;" for i, ins in enumerate(instrs)))


    def test_reduction_rules_on_synthetic_code():
        """The per-reduction rule on hand-written SASS: a two-step pipelined
        reduction passes; a one-step one does not; a step whose operand is
        staged through registers (LDG -> STS) while a group is in flight
        does not; an inner K loop counts as pipelined steps."""
        reds = ri.reductions(_sass(
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "LDGSTS.E.BYPASS.128 [R12], desc[UR8][R2.64]", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0",
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0", "LDG.E.128 R8, desc[UR8][R2.64]",
            "STS.128 [R1], R8", "LDGSTS.E.BYPASS.128 [R12], desc[UR8][R2.64]", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x0",
            "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0", "LDGSTS.E.BYPASS.128 [R12], desc[UR8][R2.64]",
            "WARPGROUP.DEPBAR.LE gsb0, 0x1", "@P0 BRA 0x0e0", "WARPGROUP.DEPBAR.LE gsb0, 0x0"))
        assert reds == [("2", True), ("1", False), ("2", False), ("loop", True)], reds
        # a load consumed by arithmetic is not staged; one stored to shared memory (through a PRMT) is
        assert ri.staged_loads(_sass("LDG.E R8, desc[UR8][R2.64]", "FFMA R20, R8, R8, RZ",
                                     "STS [R1], R20")) == 0
        assert ri.staged_loads(_sass("LDG.E.U16 R8, desc[UR8][R2.64]", "PRMT R9, R8, 0x5410, R7",
                                     "STS [R1], R9")) == 1


    def test_resident_dots_on_synthetic_ir():
        """A wgmma on a weight tile loaded before the loop and a value computed
        in it is resident; one whose operand is loaded in the loop is not,
        through a layout conversion too."""
        ir = "\n".join([
            "  tt.func @k() {",
            "    %w = tt.load %p : tensor<64x64x!tt.ptr<bf16>>",
            "    %wa = ttg.local_alloc %w : (tensor<64x64xbf16>) -> !ttg.memdesc<64x64xbf16>",
            "    scf.for %t = %a to %b step %c  : i32 {",
            "      %x = arith.mulf %u, %v : tensor<64x32xbf16>",
            "      %xa = ttg.local_alloc %x : (tensor<64x32xbf16>) -> !ttg.memdesc<64x32xbf16>",
            "      %d = ttng.warp_group_dot %wa, %xa, %acc {isAsync = true} : !ttg.memdesc<64x64xbf16>",
            "      %l = tt.load %q : tensor<64x32x!tt.ptr<bf16>>",
            "      %lc = ttg.convert_layout %l : tensor<64x32xbf16> -> tensor<64x32xbf16>",
            "      %la = ttg.local_alloc %lc : (tensor<64x32xbf16>) -> !ttg.memdesc<64x32xbf16>",
            "      %d2 = ttng.warp_group_dot %wa, %la, %acc {isAsync = true} : !ttg.memdesc<64x64xbf16>",
            "    }",
            "  }"])
        assert ri.resident_dots(ir) == 1


    def test_negative_controls_are_flagged():
        """What the tool must catch: a single-stage pipeline, OIHW weights
        handed to the kernel, a tile that spills."""
        good = ri.inspect_variant(ri.specialize(_conv_launch()))
        assert good.flags == [] and good.overlap
        one_stage = ri.inspect_variant(ri.specialize(_conv_launch(), num_stages=1))
        assert not one_stage.overlap and any("overlap" in f for f in one_stage.flags), one_stage
        two_stage = ri.inspect_variant(ri.specialize(_conv_launch(), num_stages=2))
        assert good.cp_async_waits and min(good.cp_async_waits) >= 1, good
        assert two_stage.cp_async_waits and max(two_stage.cp_async_waits) == 0, two_stage
        assert any("waited to 0" in f for f in two_stage.flags), two_stage
        oihw = ri.inspect_variant(ri.specialize(_conv_launch(torch.contiguous_format)))
        assert oihw.loop_sync_loads > 0 and any("synchronous" in f for f in oihw.flags), oihw
        spill = ri.inspect_variant(ri.specialize(_conv_launch(projection=True, R=1), BLOCK_M=128, BLOCK_N=256,
                                                 BLOCK_K=64, num_warps=8, num_stages=3))
        assert spill.spill_bytes > 0 and any("spills" in f for f in spill.flags), spill
        # a loop of several reductions (the gnconv chain): each must pipeline, or load nothing
        chain = _chain_launch(64, 2, 56)
        good = ri.inspect_variant(ri.specialize(chain, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                                num_stages=3))
        assert good.overlap and good.flags == [] and len(good.reduction_steps) == 2, good
        scratch = ri.inspect_variant(ri.specialize(chain, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                                   num_stages=3, FIRST_IN_REGS=False))  # x_0 via the scratch
        assert not scratch.overlap and scratch.one_step_reductions == 1, scratch
        assert any("one-step" in f for f in scratch.flags), scratch
        one_stage = ri.inspect_variant(ri.specialize(chain, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                                     num_stages=1))
        assert not one_stage.overlap and any("overlap" in f for f in one_stage.flags), one_stage
        narrow = ri.inspect_variant(ri.specialize(chain, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4,
                                                  num_stages=3))  # 16-pixel B tiles: 8 bytes a thread
        assert narrow.loop_async_narrow > 0 and any("under 16 B" in f for f in narrow.flags), narrow


    @pytest.mark.parametrize("kind", ["3x3", "1x1+proj", "3x3+pre"])
    def test_no_conv_config_spills(kind):
        """Every config the conv kernel's space holds (and its prune keeps for a
        large problem) compiles for sm_90 without spills, to wgmma: plain,
        with the projection shortcut, with the BN + ReLU prologue
        (bn_act_conv)."""
        k = kernels_module("conv_bn_act")
        ln = _conv_launch(projection=kind == "1x1+proj", R=1 if kind == "1x1+proj" else 3, prologue=kind == "3x3+pre")
        named = k._conv_bn_act_fwd_tuned.named_args(ln.args, ln.kwargs)
        kept = k._conv_bn_act_fwd_tuned.candidates(named)
        assert len(kept) >= (10 if kind == "3x3" else 5), kept
        for cfg in kept:
            r = ri.inspect_variant(ri.specialize(ln, **cfg.all_kwargs()))
            assert r.spill_bytes == 0 and r.mma == "HGMMA", (cfg, r)


    def _chain_launch(dim, order, hw, batch=2):
        from functools import partial
        from resfuse.hornet import HorBlock, PlainGnConv
        m = torch.nn.Sequential(HorBlock(dim, gnconv=partial(PlainGnConv, order=order, s=1 / 3)))
        x = torch.randn(batch, dim, hw, hw).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return [ln for ln in ri.record_model(m, x) if ln.name == "gnconv_chain"][0]


    @pytest.mark.parametrize("dim,order,hw", [(64, 2, 56), (512, 5, 7)])
    def test_no_chain_config_spills(dim, order, hw):
        """Every config of the gnconv chain kernel's space compiles for sm_90
        without spills; every 64-channel tile is wgmma (the 32-channel one,
        for D <= 32 only, is mma.sync)."""
        k = kernels_module("gnconv")
        ln = _chain_launch(dim, order, hw)
        for cfg in k._chain_configs():
            r = ri.inspect_variant(ri.specialize(ln, **cfg.all_kwargs()))
            assert r.spill_bytes == 0, (cfg, r)
            assert r.mma == ("HGMMA" if cfg.kwargs["BLOCK_N"] == 64 else "HMMA"), (cfg, r)
