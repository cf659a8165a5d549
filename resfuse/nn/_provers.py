"""The proofs the modules' ``from_module`` constructors need, supplied by
recognition.

``resfuse.nn`` holds modules and imports no recognition code; but
``BasicBlock.from_module(block)``, ``fuse_block``, ``GnConv.from_module``
and ``FusedHorBlock.from_module`` must not adopt a module before it is
proven that its forward computes what the fused module computes. The
provers live in ``resfuse.recognize`` (``recognize.blocks``,
``recognize.gnconv``), which registers them here when it is imported;
``import resfuse`` always imports it, so they are there before any user
code runs.
"""

from typing import Callable, Dict

_PROVERS: Dict[str, Callable] = {}


def register_prover(kind: str, prover: Callable) -> None:
    """`prover(module, **kw)`: a spec or the reason (str) it does not fit
    ('residual_block'), or None / the reason ('gnconv', 'horblock')."""
    _PROVERS[kind] = prover


def prove(kind: str, module, **kw):
    try:
        prover = _PROVERS[kind]
    except KeyError:
        raise RuntimeError(f"no prover for {kind!r} is registered: import resfuse (resfuse.recognize registers "
                           f"them)") from None
    return prover(module, **kw)
