"""resfuse.dispatch on a toy op: order, reasons, explicit requests, env var."""

import pytest

from resfuse import dispatch


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calls = []
    state = {"cuda": ["no cuda here"], "triton": ["no triton here"]}
    for b in ("cuda", "triton", "eager"):
        dispatch.register("toy_op", b, lambda p, b=b: list(state.get(b, [])),
                          lambda p, b=b: calls.append(b) or b)
    yield state, calls
    dispatch._REGISTRY.pop("toy_op", None)


def test_auto_falls_back_in_order_and_records_reasons(toy):
    state, calls = toy
    assert dispatch.run("toy_op", "auto", None) == "eager"
    d = dispatch.last_decision()
    assert d.backend == "eager" and d.fell_back
    assert d.skipped == {"cuda": ["no cuda here"], "triton": ["no triton here"]}
    state["triton"] = []
    assert dispatch.run("toy_op", "auto", None) == "triton"
    assert dispatch.last_decision().skipped == {"cuda": ["no cuda here"]}
    state["cuda"] = []
    assert dispatch.run("toy_op", "auto", None) == "cuda"
    assert not dispatch.last_decision().fell_back
    assert calls == ["eager", "triton", "cuda"]


def test_explicit_backend_raises_with_reasons(toy):
    with pytest.raises(dispatch.BackendUnavailable, match="no triton here") as e:
        dispatch.run("toy_op", "triton", None)
    assert e.value.backend == "triton" and e.value.reasons == ["no triton here"]
    assert dispatch.run("toy_op", "eager", None) == "eager"


def test_env_var_replaces_auto_only(toy, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "eager")
    assert dispatch.run("toy_op", "auto", None) == "eager"
    assert not dispatch.last_decision().fell_back
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(dispatch.BackendUnavailable):
        dispatch.run("toy_op", "auto", None)
    toy[0]["cuda"] = []
    assert dispatch.run("toy_op", "cuda", None) == "cuda"  # explicit argument wins over the env var
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="RESFUSE_BACKEND"):
        dispatch.run("toy_op", "auto", None)


@pytest.mark.parametrize("bad", ["CUDA", "", None, 3, "torch"])
def test_invalid_backend_names_argument(bad):
    with pytest.raises(ValueError, match="backend"):
        dispatch.validate_backend(bad)


def test_reasons_only_candidate_never_runs(monkeypatch):
    """A backend registered without an implementation reports why and is
    passed over, even when its check finds nothing wrong."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.register("toy_plan_only", "cuda", lambda p: [])
    dispatch.register("toy_plan_only", "eager", lambda p: [], lambda p: "eager")
    try:
        assert dispatch.run("toy_plan_only", "auto", None) == "eager"
        assert dispatch.last_decision().skipped["cuda"] == ["no cuda implementation of toy_plan_only yet"]
        with pytest.raises(dispatch.BackendUnavailable, match="no cuda implementation"):
            dispatch.run("toy_plan_only", "cuda", None)
    finally:
        dispatch._REGISTRY.pop("toy_plan_only", None)
