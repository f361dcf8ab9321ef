"""Batching concurrent scoring requests into shared forward passes.

Requests that arrive while the model is busy (several training processes, several routed
teachers on one server) wait in a queue; one worker takes every waiting request — up to
``max_tokens`` completion tokens, after waiting at most ``max_wait`` seconds for more once the
first has arrived — merges those that ask the same thing (temperature, top-k, number of
caller-chosen ids, dtype, payload) into one :class:`~opd.serve.payload.ScoreRequest`, scores it once, and
hands each caller its own rows. The model is only ever used by that one worker (one thread), so
requests never run concurrently on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from opd.serve.hidden import HiddenAnswer
from opd.serve.payload import ScoreAnswer, ScoreRequest

__all__ = ["Batcher", "merge_requests", "split_answer"]


def _key(r: ScoreRequest) -> tuple:
    return (r.temperature, r.topk, None if r.token_ids is None else r.token_ids.shape[1], r.dtype, r.payload)


def merge_requests(requests: list[ScoreRequest]) -> ScoreRequest:
    """One request holding every sequence of ``requests`` (which must agree on :func:`_key`)."""
    first = requests[0]
    if any(_key(r) != _key(first) for r in requests):
        raise ValueError("only requests with the same temperature, topk, token_ids width, dtype and payload can be merged")
    token_ids = None if first.token_ids is None else np.concatenate([r.token_ids for r in requests])
    return ScoreRequest(prompts=[p for r in requests for p in r.prompts],
                        completions=[c for r in requests for c in r.completions], topk=first.topk,
                        token_ids=token_ids, temperature=first.temperature, dtype=first.dtype,
                        payload=first.payload)


def split_answer(answer: ScoreAnswer | HiddenAnswer, requests: list[ScoreRequest]) -> list:
    """The rows of a merged answer, given back per original request."""
    out, start = [], 0
    for r in requests:
        sl = slice(start, start + r.n_tokens)
        start += r.n_tokens
        if isinstance(answer, HiddenAnswer):
            out.append(answer.take(sl))
            continue

        def cut(a: np.ndarray | None, sl: slice = sl) -> np.ndarray | None:
            return None if a is None else a[sl]

        out.append(ScoreAnswer(sampled_logprobs_N=answer.sampled_logprobs_N[sl], topk_ids_NK=cut(answer.topk_ids_NK),
                               topk_logprobs_NK=cut(answer.topk_logprobs_NK),
                               token_logprobs_NM=cut(answer.token_logprobs_NM)))
    return out


@dataclass
class _Pending:
    request: ScoreRequest
    future: asyncio.Future = field(repr=False)


class Batcher:
    """An asyncio front of a blocking scoring function ``score(ScoreRequest) -> ScoreAnswer``.

    Args:
        score: runs in a worker thread, one call at a time.
        max_tokens: completion tokens merged into one call at most (a larger single request still
            runs, alone).
        max_wait: seconds the worker waits for more requests after the first one arrived.

    ``batches`` and ``requests_scored`` count what the worker did (``GET /v1/info`` reports them).
    """

    def __init__(self, score: Callable[[ScoreRequest], ScoreAnswer], *, max_tokens: int = 65536,
                 max_wait: float = 0.005):
        self.score = score
        self.max_tokens = max_tokens
        self.max_wait = max_wait
        self.batches = 0
        self.requests_scored = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, request: ScoreRequest) -> ScoreAnswer:
        """Score ``request`` (possibly together with others); raises what scoring raised."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(request, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        first = await self._queue.get()
        batch, tokens = [first], first.request.n_tokens
        deadline = asyncio.get_running_loop().time() + self.max_wait
        while tokens < self.max_tokens:
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
            batch.append(item)
            tokens += item.request.n_tokens
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            groups: dict[tuple, list[_Pending]] = {}
            for item in batch:
                groups.setdefault(_key(item.request), []).append(item)
            for items in groups.values():
                requests = [i.request for i in items]
                try:
                    merged = merge_requests(requests)
                    answer = await loop.run_in_executor(None, self.score, merged)
                    parts = split_answer(answer, requests)
                except Exception as err:  # noqa: BLE001 — handed to every caller of the group
                    for i in items:
                        if not i.future.done():
                            i.future.set_exception(err)
                    continue
                self.batches += 1
                self.requests_scored += len(items)
                for i, part in zip(items, parts):
                    if not i.future.done():
                        i.future.set_result(part)
