"""Recognition: what a module computes, before ``convert`` replaces it.

``dataflow`` reads a module's forward with torch.fx (submodule calls kept
opaque) so that a module is replaced only when its forward is shown to be
the fused pattern; the pattern matchers use it. ``heads`` finds conv -> BN
(-> act) chains, ``prologues`` BN (-> act) -> conv chains and gives each BN
to one conv (``resolve_chains``); ``stem`` the ResNet stem; ``blocks``
residual blocks and ``gnconv`` HorNet's gnconv / HorBlock, whose proofs
``resfuse.nn``'s ``from_module`` constructors ask for (registered here, on
import, in ``nn._provers``).
"""

from . import blocks, gnconv  # noqa: F401  (register their provers with resfuse.nn)
