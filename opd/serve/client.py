"""An HTTP client for the servers a run depends on (teacher and rollout servers), with bounded retries.

Every request goes through :meth:`ServiceClient.request`:

* a connection that is refused or reset, a timeout, an HTTP 5xx / 408 / 429, a body that is not
  JSON, or an answer the caller's ``validate`` function rejects (wrong shapes, NaN, missing fields)
  is retried up to ``retries`` times with exponential back-off ``backoff · 2^i`` (capped at
  ``max_backoff`` seconds) — a server that restarts mid-run is waited for;
* any other HTTP 4xx is not retried (the request itself is wrong; retrying cannot help);
* after the last attempt a :class:`~opd.errors.ServiceError` is raised whose message is one line:
  which server (its role and URL), what it returned the last time, and after how many attempts.

The training loop catches :class:`~opd.errors.RunFault` (the parent of ``ServiceError``), writes a
checkpoint of the last completed step and prints the ``--resume`` command.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from opd.errors import ServiceError

__all__ = ["BadAnswer", "ServiceClient", "ServiceRejected", "check_finite", "excerpt"]

T = TypeVar("T")

#: HTTP statuses that mean "try again later" (the server is busy, restarting or timed out).
_RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ServiceRejected(ServiceError):
    """The server refused the request itself (an HTTP 4xx other than 408 / 429): retrying cannot help.
    ``status`` and ``detail`` (the body, on one line) say what it answered."""

    def __init__(self, message: str, status: int, detail: str):
        super().__init__(message)
        self.status = status
        self.detail = detail


class BadAnswer(ValueError):
    """A server's answer that parsed as JSON but is unusable (wrong shape, NaN, missing field)."""


def excerpt(text: str | bytes, limit: int = 160) -> str:
    """``text`` on one line, cut to ``limit`` characters (for error messages)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def check_finite(name: str, values: Any) -> None:
    """Raise :class:`BadAnswer` when a sequence of floats (or a tensor) holds NaN or ±Inf where a
    log-probability must be finite (``-inf`` is allowed: probability 0)."""
    try:
        import torch

        if isinstance(values, torch.Tensor):
            bad = torch.isnan(values) | (values == math.inf)
            if bool(bad.any()):
                raise BadAnswer(f"{name} holds {int(bad.sum())} NaN/+Inf value(s)")
            return
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    for v in values:
        if v is None or (isinstance(v, float) and (math.isnan(v) or v == math.inf)):
            raise BadAnswer(f"{name} holds a non-finite value ({v!r})")


class ServiceClient:
    """A JSON-over-HTTP client of one server with bounded retries (see the module docstring).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        role: what the server is to this run (``"teacher server"``, ``"rollout server"``), used in
            error messages.
        timeout: seconds one attempt may take (connect + read).
        retries: further attempts after the first one.
        backoff: seconds before the first retry; doubles each time, capped at ``max_backoff``.
    """

    def __init__(self, url: str, *, role: str, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 max_backoff: float = 8.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{role} URL {url!r} must start with http:// or https://, e.g. http://127.0.0.1:8000")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"timeout must be > 0 and retries, backoff >= 0 (got {timeout}, {retries}, {backoff})")
        import httpx  # here: opd.serve.client is imported by config-free code paths only when a server is used

        self.url = url.rstrip("/")
        self.role = role
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._http = httpx.Client(timeout=httpx.Timeout(self.timeout), trust_env=False)
        self._httpx = httpx

    def close(self) -> None:
        self._http.close()

    def get(self, path: str, validate: Callable[[Any], T] = lambda x: x) -> T:  # type: ignore[assignment,return-value]
        return self.request("GET", path, None, validate)

    def post(self, path: str, payload: Any, validate: Callable[[Any], T] = lambda x: x) -> T:  # type: ignore[assignment,return-value]
        return self.request("POST", path, payload, validate)

    def request(self, method: str, path: str, payload: Any, validate: Callable[[Any], T]) -> T:
        """``validate(parsed JSON)`` of the server's answer (``None`` for an empty body), retried as the
        module docstring says.

        Raises:
            ServiceError: the last attempt failed, or the server rejected the request (HTTP 4xx).
        """
        endpoint = f"{self.url}{path}"
        began = time.monotonic()
        problem = "no attempt was made"
        attempts = 0
        rejected: tuple[int, str] | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            attempts = attempt + 1
            try:
                response = self._http.request(method, endpoint, json=payload)
            except self._httpx.TimeoutException:
                problem = f"did not answer within {self.timeout:g} s"
                continue
            except self._httpx.TransportError as err:  # refused, reset, DNS, closed mid-answer
                problem = f"could not be reached ({type(err).__name__}: {excerpt(str(err), 100) or 'no detail'})"
                continue
            if response.status_code >= 400:
                problem = f"answered HTTP {response.status_code}: {excerpt(response.text) or '(empty body)'}"
                if response.status_code in _RETRY_STATUSES:
                    continue
                rejected = (response.status_code, excerpt(response.text, 400))
                break  # the request is wrong: retrying cannot help
            body = response.content
            try:
                parsed = json.loads(body) if body.strip() else None
            except ValueError as err:
                problem = f"answered malformed JSON ({err.msg} at char {err.pos}; body starts {excerpt(body, 80)!r})"
                continue
            try:
                return validate(parsed)
            except (BadAnswer, KeyError, TypeError, ValueError, IndexError) as err:
                what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                problem = f"answered something unusable: {excerpt(what, 200)}"
                continue
        seconds = time.monotonic() - began
        message = (f"{self.role} {endpoint} {problem} (after {attempts} attempt{'s' if attempts != 1 else ''} over "
                   f"{seconds:.1f} s)")
        if rejected is not None:
            raise ServiceRejected(message, *rejected)
        raise ServiceError(message)
