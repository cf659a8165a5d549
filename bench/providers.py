"""The implementations a benchmark compares, and whether each can run here.

A provider is a name; each op (``bench.cases``) knows how to build that
provider's callable for one of its workloads. This module says, per device
and dtype, which providers can run and, when one cannot, why.

    eager                  PyTorch eager (cuDNN on a GPU), channels_last
    compile                torch.compile(eager), default mode
    compile-max-autotune   torch.compile(eager, mode='max-autotune-no-cudagraphs'):
                           max-autotune's kernels without its own CUDA graphs,
                           since the harness captures graphs for every provider
                           alike (at batch 1) and cudagraph-trees would copy the
                           rotated inputs into its static buffers
    resfuse-triton         resfuse, backend='triton'
    resfuse-cuda           resfuse, backend='cuda' (when the extension is built)
    resfuse-eager          resfuse, backend='eager' (the folded eager path: what
                           resfuse runs on a CPU)
"""

from typing import Dict, List

import torch

PROVIDERS = ("eager", "compile", "compile-max-autotune", "resfuse-triton", "resfuse-cuda", "resfuse-eager")
BASELINE = "eager"

#: What a run uses when none are named: everything on a GPU; on a CPU only
#: what truly runs there and is cheap to set up (torch.compile on a 2-core
#: CPU spends minutes in the C++ compiler; name it to run it anyway).
DEFAULT_GPU = PROVIDERS
DEFAULT_CPU = ("eager", "resfuse-eager")
QUICK_GPU = ("eager", "compile", "resfuse-triton", "resfuse-cuda")
QUICK_CPU = DEFAULT_CPU

COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune-no-cudagraphs"}


def resfuse_backend(provider: str) -> str:
    """'resfuse-triton' -> 'triton'."""
    if not provider.startswith("resfuse-"):
        raise ValueError(f"{provider!r} is not a resfuse provider")
    return provider[len("resfuse-"):]


def provider_reasons(provider: str, device: torch.device, dtype: torch.dtype) -> List[str]:
    """Why `provider` cannot run on this device and dtype ([] if it can).

    Shape-dependent refusals (groups, say) surface when the workload is
    built or checked, as that provider's error."""
    if provider not in PROVIDERS:
        return [f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}"]
    if provider in COMPILE_MODES:
        if not hasattr(torch, "compile"):
            return ["this torch has no torch.compile"]
        return []
    if provider.startswith("resfuse-"):
        backend = resfuse_backend(provider)
        from resfuse._backends import cuda_reasons, interpreting, triton_reasons
        if backend == "triton":
            if device.type == "cpu" and not interpreting():
                return ["cpu: Triton kernels need a GPU (or TRITON_INTERPRET=1, to check them; "
                        "interpreter timings mean nothing)"]
            return triton_reasons(device, dtype)
        if backend == "cuda":  # every op a benchmark times has a cuda backend (resfuse._C's OPS)
            return cuda_reasons("conv_bn_act", device, dtype)
        return []
    return []


def available(providers, device: torch.device, dtype: torch.dtype) -> Dict[str, List[str]]:
    """provider -> reasons it cannot run (empty list: it can)."""
    return {p: provider_reasons(p, device, dtype) for p in providers}


def reset_compile_state(cache_limit: int = 64) -> None:
    """Forget compiled code before a new workload: each workload compiles
    afresh, and the shared eager function's code object does not run into
    dynamo's recompile limit (which would silently fall back to eager)."""
    import torch._dynamo
    torch._dynamo.reset()
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        try:
            if hasattr(cfg, attr):
                setattr(cfg, attr, max(getattr(cfg, attr), cache_limit))
                break
        except Exception:  # noqa: BLE001  (a deprecated alias that refuses writes)
            continue


def compiled(fn, provider: str):
    return torch.compile(fn, mode=COMPILE_MODES[provider], dynamic=False)
