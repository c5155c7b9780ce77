"""The shared "matches masked dense" rule."""

import gc
import weakref

import pytest
import torch

from sparse_prune.agreement import Mismatch, allowed_error, check_matches, relative_error
from sparse_prune.timing import spread, time_samples


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_dtype_gemm_passes_and_scaled_error_fails(dtype):
    torch.manual_seed(0)
    x, w = torch.randn(37, 123, dtype=torch.float64), torch.randn(45, 123, dtype=torch.float64)
    ref = x @ w.t()
    base = (x.to(dtype) @ w.to(dtype).t())
    # a kernel with another accumulation order but the same precision passes
    other = (x.to(dtype).float() @ w.to(dtype).float().t()).to(dtype)
    info = check_matches(other, ref, base, "gemm")
    assert info["error"] <= info["allowed"]
    # a small output-proportional error (2% of every entry) fails in every dtype: no flat 1.0 floor
    with pytest.raises(Mismatch, match="gemm"):
        check_matches((ref * 1.02).to(dtype), ref, base, "gemm")


def test_wrong_results_fail_loudly():
    ref = torch.randn(8, 16, dtype=torch.float64)
    base = ref.float()
    for bad in (torch.full_like(base, float("nan")), torch.zeros_like(base), base[:, :8], base + 1e-3):
        with pytest.raises(Mismatch):
            check_matches(bad, ref, base)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert allowed_error(torch.bfloat16, 0.0) == torch.finfo(torch.bfloat16).eps
    with pytest.raises(TypeError, match="dtype"):
        allowed_error(torch.int32, 0.0)


def test_time_samples_rotate_order_and_spread():
    calls = []
    samples = time_samples({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, reps=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B, B A, A B
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3}
    s = spread([4.0, 1.0, 3.0, 2.0])
    assert (s["min"], s["q1"], s["median"], s["q3"], s["max"]) == (1.0, 1.75, 2.5, 3.25, 4.0)
    with pytest.raises(ValueError, match="reps"):
        time_samples({"a": lambda: None}, reps=0)
    with pytest.raises(ValueError, match="fns"):
        time_samples({})


def test_time_samples_keep_the_collector_out_of_the_rounds():
    """No collection runs inside a timed call; what the calls leave is collected between rounds
    (a cached cycle replaced on every call does not pile up); the caller's collector state
    (enabled or not, objects it froze) is the same afterwards."""
    class Cycle:
        pass

    inside, during_calls, left, cache, frozen_inside = [False], [], [], {}, []

    def watch(phase, info):
        if phase == "start":
            during_calls.append(inside[0])

    def call():
        inside[0] = True
        frozen_inside.append(gc.get_freeze_count() > 0)  # what was alive before is out of the walks
        c = Cycle()
        c.me = c
        c.payload = [0] * 1000
        cache["c"] = c  # the previous one dies here, alive at the last collection: old garbage
        left.append(weakref.ref(c))
        inside[0] = False

    gc.callbacks.append(watch)
    try:
        time_samples({"a": call, "b": call}, warmup=1, reps=30)
    finally:
        gc.callbacks.remove(watch)
    assert during_calls and not any(during_calls)  # collections ran, none of them in a call
    assert all(frozen_inside)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert sum(r() is not None for r in left) <= 3  # the last round's two and the one they replaced
    gc.freeze()  # a caller's frozen objects stay frozen, and a disabled collector stays off
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        time_samples({"a": lambda: None}, warmup=0, reps=2)
        assert not gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.enable()
