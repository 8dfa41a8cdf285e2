"""The hand-off of a request to a worker thread (``bridge.web.asgi.off_loop``): the answer
is the thread's, or the budget's once it runs out; nothing the thread does late reaches
the request, and a call still queued when its request gave up is never run."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from bridge.web.asgi import off_loop
from bridge.web.responses import Reply

ANSWER = Reply(200, (), b"thread")
TIMED_OUT = Reply(503, (), b"budget")


def budget_reply() -> Reply:
    return TIMED_OUT


def test_the_threads_answer_is_the_requests() -> None:
    with ThreadPoolExecutor(1) as pool:
        reply = asyncio.run(off_loop(pool, 5.0, lambda: ANSWER, on_timeout=budget_reply))
    assert reply is ANSWER


def test_what_the_thread_raises_is_raised_to_the_request() -> None:
    def fails() -> Reply:
        raise LookupError("from the thread")

    with ThreadPoolExecutor(1) as pool, pytest.raises(LookupError, match="from the thread"):
        asyncio.run(off_loop(pool, 5.0, fails, on_timeout=budget_reply))


def test_past_the_budget_the_request_gets_the_timeout_reply_and_never_the_late_one() -> None:
    release = threading.Event()
    finished = threading.Event()

    def slow() -> Reply:
        release.wait(10)
        finished.set()
        return ANSWER

    errors: list[dict] = []

    async def ask() -> Reply:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: errors.append(context))
        reply = await off_loop(pool, 0.2, slow, on_timeout=budget_reply)
        release.set()
        # The pool's one thread ends the slow call (and hands its late answer to this loop)
        # before it runs this; the loop then runs that answer before this one's: settling a
        # settled request must be a no-op.
        await loop.run_in_executor(pool, lambda: None)
        return reply

    with ThreadPoolExecutor(1) as pool:
        reply = asyncio.run(ask())
    assert reply is TIMED_OUT
    assert finished.is_set()
    assert errors == []


def test_a_call_still_queued_when_its_budget_runs_out_is_never_run() -> None:
    busy = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def hold_the_only_thread() -> Reply:
        busy.set()
        release.wait(10)
        return ANSWER

    def queued() -> Reply:
        ran.append("queued")
        return ANSWER

    async def ask() -> Reply:
        holding = asyncio.ensure_future(off_loop(pool, 10.0, hold_the_only_thread))
        await asyncio.get_running_loop().run_in_executor(None, busy.wait, 10)
        reply = await off_loop(pool, 0.2, queued, on_timeout=budget_reply)
        release.set()
        assert (await holding) is ANSWER
        # The pool's one thread takes its queue in order: the queued call would run before this.
        await asyncio.get_running_loop().run_in_executor(pool, lambda: None)
        return reply

    with ThreadPoolExecutor(1) as pool:
        reply = asyncio.run(ask())
    assert reply is TIMED_OUT
    assert ran == []
