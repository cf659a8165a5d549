"""Recognition: what a module computes, before ``convert`` replaces it.

``dataflow`` reads a module's forward with torch.fx (submodule calls kept
opaque) so that a module is replaced only when its forward is shown to be
the fused pattern; the pattern matchers use it.
"""
