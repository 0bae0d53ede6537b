"""What `CapturedCalls` does around its captures. The captures themselves need a GPU: there,
tests/runtime/test_torch_backend.py holds their replays bit-identical to plain calls."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from cosmos_edge.runtime.engines import cuda_graphs


@pytest.fixture(autouse=True)
def captures_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts in a process whose captures have not failed."""
    monkeypatch.setattr(cuda_graphs, "_CAPTURES_OFF", threading.Event())


def scripted_captures(failures: dict[int, BaseException | None]) -> tuple[type, list[cuda_graphs.Capture]]:
    """A stand-in for `CapturedCall` whose n-th capture (from 1) fails with `failures[n]`, and whose replays add 100
    (to tell them from plain calls); and the list of the functions it was asked to capture."""
    attempts: list[cuda_graphs.Capture] = []

    class Scripted:
        def __init__(self, function: cuda_graphs.Capture, inputs: object, pool: object, holds: object) -> None:
            attempts.append(function)
            failure = failures.get(len(attempts))
            if failure is not None:
                raise failure
            self.function = function

        def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.function(*inputs) + 100

    return Scripted, attempts


def test_a_failed_capture_is_logged_and_no_more_are_tried_in_the_process_but_those_made_are_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    refused = cuda_graphs.CaptureFailed("operation not permitted when stream is capturing")
    scripted, attempts = scripted_captures({2: refused})
    monkeypatch.setattr(cuda_graphs, "CapturedCall", scripted)
    calls = cuda_graphs.CapturedCalls(limit=4, pool=None)
    x = torch.arange(4.0)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.runtime.engines.cuda_graphs"):
        assert torch.equal(calls("first", lambda t: t * 2, [x]), x * 2 + 100)  # captured
        assert torch.equal(calls("second", lambda t: t + 1, [x]), x + 1)  # refused: plain
        assert torch.equal(calls("third", lambda t: t + 2, [x]), x + 2)  # not tried
        assert torch.equal(calls("first", lambda t: t * 2, [x]), x * 2 + 100)  # still replayed
        # Another network's calls (torch may still count the failed capture as underway): not tried either.
        assert torch.equal(cuda_graphs.CapturedCalls(limit=4, pool=None)("other", lambda t: t, [x]), x)
    assert len(attempts) == 2
    assert "no call of this process is captured from now on (those made are kept" in caplog.text
    assert "operation not permitted when stream is capturing" in caplog.text


def test_a_capture_out_of_memory_leaves_that_key_plain_and_others_captured(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out_of_memory = cuda_graphs.CaptureFailed("CUDA out of memory")
    out_of_memory.__cause__ = torch.OutOfMemoryError("out of memory")
    scripted, attempts = scripted_captures({1: out_of_memory})
    monkeypatch.setattr(cuda_graphs, "CapturedCall", scripted)
    calls = cuda_graphs.CapturedCalls(limit=4, pool=None)
    x = torch.ones(2)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.runtime.engines.cuda_graphs"):
        assert torch.equal(calls("big", lambda t: t, [x]), x)  # plain, and not tried again
        assert torch.equal(calls("big", lambda t: t, [x]), x)
        assert torch.equal(calls("small", lambda t: t, [x]), x + 100)  # later keys are still captured
    assert len(attempts) == 2
    assert "ran out of memory: this call runs without a graph" in caplog.text


def test_an_error_of_the_call_itself_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*args: object) -> None:  # as the plain call a capture makes first, failing: not a capture failure
        raise torch.OutOfMemoryError("CUDA out of memory in the call")

    monkeypatch.setattr(cuda_graphs, "CapturedCall", failing)
    with pytest.raises(torch.OutOfMemoryError, match="in the call"):
        cuda_graphs.CapturedCalls(limit=4, pool=None)("key", lambda t: t, [torch.ones(1)])


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
