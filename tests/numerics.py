"""The one definition of "correct" (GUIDE §3), used by every test.

pass iff  ||out - ref|| / ||ref||  <=  max(2 * err_eager, floor[dtype])

ref is the float64 eager reference, err_eager is eager PyTorch's own
relative error in the tested dtype against the same reference. NaN in
`out` where `ref` has none never passes.
"""

import torch

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    finite = torch.isfinite(ref64)
    if not torch.equal(torch.isnan(out64), torch.isnan(ref64)):
        return float("inf")
    inf = torch.isinf(ref64)
    if not torch.equal(out64[inf], ref64[inf]):  # Inf must match exactly (NaN != NaN: not compared)
        return float("inf")
    diff = (out64[finite] - ref64[finite]).norm().item()
    scale = ref64[finite].norm().item()
    return diff / scale if scale > 0 else diff


def tolerance(eager_out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """2x eager's own error, at least the floor. An eager output that is
    itself non-finite where the reference is not gives no licence: the
    floor applies then."""
    err = rel_err(eager_out, ref)
    return max(2.0 * err if err != float("inf") else 0.0, FLOOR[dtype])


def assert_matches(out, ref, eager_out, dtype, what="", seed=None):
    """Assert `out` is as close to the float64 `ref` as the rule demands;
    returns (err, tol) for reporting."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err, tol = rel_err(out, ref), tolerance(eager_out, ref, dtype)
    assert err <= tol, f"{what}: rel err {err:.3e} > tol {tol:.3e} (dtype {dtype}, seed {seed})"
    return err, tol


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an unwritten element fails the comparison."""
    return t.fill_(float("nan"))
