"""What `CapturedCalls` does around its captures. The captures themselves need a GPU: there,
tests/runtime/test_torch_backend.py holds their replays bit-identical to plain calls."""

from __future__ import annotations

import logging

import pytest
import torch

from cosmos_edge.runtime.engines import cuda_graphs


def test_a_failed_capture_is_logged_and_its_calls_run_plainly_from_then_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[object] = []

    def refused(*args: object) -> None:
        attempts.append(args)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "CapturedCall", refused)
    calls = cuda_graphs.CapturedCalls(limit=4, pool=None)
    x = torch.arange(4.0)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.runtime.engines.cuda_graphs"):
        assert torch.equal(calls("first", lambda t: t * 2, [x]), x * 2)
        assert torch.equal(calls("second", lambda t: t + 1, [x]), x + 1)
    assert len(attempts) == 1  # no capture is tried again
    assert "CUDA graph capture failed, running these calls without graphs" in caplog.text
    assert "operation not permitted when stream is capturing" in caplog.text


def test_the_first_keys_up_to_the_limit_are_captured_and_later_ones_run_plainly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[float] = []

    class Recorded:
        def __init__(self, function: cuda_graphs.Capture, inputs: list[torch.Tensor], pool: object, holds: object):
            self.function = function
            made.append(function(*inputs).item())

        def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.function(*inputs)

    monkeypatch.setattr(cuda_graphs, "CapturedCall", Recorded)
    calls = cuda_graphs.CapturedCalls(limit=3, pool=None)
    one = torch.ones(())
    # A query of 5 distinct calls, three times: most-recently-used eviction would capture on all 15 calls.
    results = [calls(key, lambda t, key=key: t * key, [one]).item() for _ in range(3) for key in range(1, 6)]
    assert made == [1.0, 2.0, 3.0]
    assert results == [1.0, 2.0, 3.0, 4.0, 5.0] * 3
