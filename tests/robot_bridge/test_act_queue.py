"""`ActQueue` alone: every job put in is answered exactly once, whoever takes it out."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from cosmos_edge.robot_bridge.act_queue import ActQueue, Answer, Job
from cosmos_edge.robot_bridge.protocol import ActReply, ActRequest, ErrorCode, MessageError


def _job(key: bytes | int, obs_id: int, *, timeout_ms: int | None = None, future: bool = False) -> Job:
    request = ActRequest(
        request_id=obs_id,
        obs_id=obs_id,
        capture_time_ns=0,
        instruction="task",
        images={"cam": np.zeros((2, 2, 3), np.uint8)},
        proprio=np.zeros(2, np.float32),
        timeout_ms=timeout_ms,
    )
    reply_future: Future[ActReply] | None = Future() if future else None
    return Job(key, request, "reactive", 0, time.perf_counter(), 0.0, "peer", reply_future)


def _codes(answers: list[Answer]) -> dict[int, ErrorCode | str]:
    codes: dict[int, ErrorCode | str] = {}
    for answer in answers:
        obs_id = answer.job.request.obs_id
        assert obs_id not in codes, f"observation {obs_id} answered twice"
        codes[obs_id] = answer.outcome.code if isinstance(answer.outcome, MessageError) else "result"
    return codes


def _never() -> bool:
    return False


def test_jobs_are_refused_before_accept_and_after_close_for_good() -> None:
    queue = ActQueue(max_pending=4)
    with pytest.raises(MessageError) as starting:
        queue.put(_job(b"a", 1))
    assert starting.value.code is ErrorCode.OVERLOADED
    queue.accept()
    queue.put(_job(b"a", 2))
    assert queue.close("stopped") == 1
    with pytest.raises(MessageError) as closed:
        queue.put(_job(b"a", 3))
    assert closed.value.code is ErrorCode.SHUTTING_DOWN
    queue.accept()  # a second serve_forever: closed is closed
    assert not queue.accepting and queue.take(_never) is None
    assert _codes(queue.answers()) == {2: ErrorCode.SHUTTING_DOWN}


def test_a_newer_observation_supersedes_the_waiting_one_and_keeps_its_place() -> None:
    queue = ActQueue(max_pending=4)
    queue.accept()
    queue.put(_job(b"a", 1))
    queue.put(_job(b"b", 2))
    queue.put(_job(b"a", 3))
    assert _codes(queue.answers()) == {1: ErrorCode.SUPERSEDED}
    first = queue.take(_never)
    assert first is not None and first.request.obs_id == 3  # controller a was first in line


def test_a_full_queue_makes_room_by_answering_expired_jobs_and_dropping_cancelled_ones() -> None:
    queue = ActQueue(max_pending=2)
    queue.accept()
    expired, cancelled = _job(b"a", 1, timeout_ms=1), _job(2, 2, future=True)
    queue.put(expired)
    queue.put(cancelled)
    assert cancelled.future is not None and cancelled.future.cancel()
    time.sleep(0.002)
    queue.put(_job(b"c", 3))
    queue.put(_job(b"d", 4))
    with pytest.raises(MessageError) as full:
        queue.put(_job(b"e", 5))
    assert full.value.code is ErrorCode.OVERLOADED
    assert _codes(queue.answers()) == {1: ErrorCode.EXPIRED}  # the cancelled one has nobody to answer


def test_the_running_job_is_answered_once_by_the_worker_or_by_whoever_takes_it_back() -> None:
    queue = ActQueue(max_pending=4)
    queue.accept()
    queue.put(_job(b"a", 1))
    queue.put(_job(b"b", 2))
    on_time = queue.take(_never)
    assert on_time is not None and queue.running
    assert queue.finish(Answer(on_time, MessageError(ErrorCode.INTERNAL, "", "x", 1)))
    late = queue.take(_never)
    assert late is not None
    taken_back = queue.take_back(lambda job: MessageError(ErrorCode.SHUTTING_DOWN, "", "window over", 2))
    assert taken_back is late and not queue.running
    assert not queue.finish(Answer(late, MessageError(ErrorCode.INTERNAL, "", "too late", 2)))
    assert _codes(queue.answers()) == {1: ErrorCode.INTERNAL, 2: ErrorCode.SHUTTING_DOWN}


def test_a_stop_request_keeps_the_worker_from_starting_what_waits() -> None:
    queue = ActQueue(max_pending=4)
    queue.accept()
    queue.put(_job(b"a", 1))
    assert queue.take(lambda: True) is None
    assert queue.close("stopped") == 1


def test_close_wakes_a_waiting_worker() -> None:
    queue = ActQueue(max_pending=4)
    queue.accept()
    taken: list[Job | None] = []
    worker = threading.Thread(target=lambda: taken.append(queue.take(_never)))
    worker.start()
    time.sleep(0.05)
    assert queue.close("stopped") == 0
    worker.join(5.0)
    assert not worker.is_alive() and taken == [None]


def test_many_threads_putting_while_the_queue_closes_lose_no_answer() -> None:
    queue = ActQueue(max_pending=1000)
    queue.accept()
    refused: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(3)

    def put_many(first: int) -> None:
        start.wait()
        for obs_id in range(first, first + 200):
            if obs_id == 300:  # the middle thread closes the queue halfway through its puts: the others go on
                queue.close("stopped")
            try:
                queue.put(_job(obs_id, obs_id))
            except MessageError:
                with lock:
                    refused.append(obs_id)

    threads = [threading.Thread(target=put_many, args=(first,)) for first in (0, 200, 400)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answered = _codes(queue.answers())
    assert sorted([*answered, *refused]) == list(range(600))
    assert 300 in refused and all(code is ErrorCode.SHUTTING_DOWN for code in answered.values())
