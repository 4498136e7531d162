"""Black-box teacher: embeddings from an OpenAI-compatible `/v1/embeddings` HTTP endpoint.

For teachers reachable only as a service (vLLM, TEI, hosted APIs). `HttpEmbedder.embed` is
synchronous because Ray Data actors call it from `__call__`; inside, one aiohttp session per call
sends batched requests concurrently, rate-limited and retried, and puts rows back in input order."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import random
import time

import aiohttp
import numpy as np

from leaf_ray.config import HttpTeacherConfig

RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx: worth another try


MAX_BACKOFF_S = 30.0


class HttpTeacherError(RuntimeError):
    """A request failed for good. `args` stay (url, status, detail) so it pickles across Ray."""

    def __init__(self, url: str, status: int | None, detail: str):
        super().__init__(url, status, detail)
        self.url, self.status, self.detail = url, status, detail

    def __str__(self) -> str:
        status = f"HTTP {self.status}" if self.status is not None else "no response"
        return f"{self.url}: {status}: {self.detail}"


class _Retryable(Exception):
    """A failed try worth repeating; `wait_s` is the server's Retry-After, when it sent one."""

    def __init__(self, status: int | None, detail: str, wait_s: float | None = None):
        super().__init__(status, detail, wait_s)
        self.status, self.detail, self.wait_s = status, detail, wait_s


def _error_text(body: str) -> str:
    """The OpenAI-style `error.message` (or TEI's string `error`) if present, else the body."""
    try:
        error = json.loads(body)["error"]
        return str(error["message"] if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body[:500] or "(empty body)"


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; None when absent or an HTTP date (then we use our own backoff)."""
    try:
        return max(0.0, float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


class HttpEmbedder:
    """Embeds texts through the endpoint; row i of the result is texts[i]'s vector."""

    def __init__(self, settings: HttpTeacherConfig, model: str, api_key: str | None = None):
        self.settings, self.model, self.api_key = settings, model, api_key
        self.endpoint = f"{settings.url}/embeddings"
        rps = settings.requests_per_second
        self._interval = 1.0 / rps if rps else 0.0
        self._next_slot = 0.0  # monotonic time the next request may start; kept across calls

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.settings.dimensions or 0), dtype=np.float32)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._embed(list(texts)))
        # Called from inside a running event loop (e.g. a notebook): run ours in a worker thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._embed(list(texts))).result()

    async def _embed(self, texts: list[str]) -> np.ndarray:
        s = self.settings
        step = s.texts_per_request
        chunks = [texts[i : i + step] for i in range(0, len(texts), step)]
        gate = asyncio.Semaphore(s.max_concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=s.max_concurrency),
            timeout=aiohttp.ClientTimeout(total=s.timeout_s),
        ) as session:
            tasks = [asyncio.ensure_future(self._request(session, gate, c)) for c in chunks]
            try:
                parts = await asyncio.gather(*tasks)
            finally:  # one request failed for good: stop the others before the session closes
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        dims = sorted({part.shape[1] for part in parts})
        if len(dims) != 1 or (s.dimensions is not None and dims != [s.dimensions]):
            raise HttpTeacherError(self.endpoint, 200, f"inconsistent embedding dimensions {dims}")
        return np.concatenate(parts)

    async def _wait_turn(self) -> None:
        """Interval limiter: each request takes the next free slot. Atomic within the loop."""
        if self._interval:
            now = time.monotonic()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
            await asyncio.sleep(slot - now)

    async def _request(
        self, session: aiohttp.ClientSession, gate: asyncio.Semaphore, texts: list[str]
    ) -> np.ndarray:
        s = self.settings
        body: dict = {"model": self.model, "input": texts, "encoding_format": "float"}
        if s.dimensions is not None:
            body["dimensions"] = s.dimensions
        async with gate:
            for attempt in range(s.max_retries + 1):
                await self._wait_turn()
                try:
                    return await self._post(session, body, len(texts))
                except _Retryable as e:
                    last = e
                    if e.wait_s is not None and e.wait_s > s.max_retry_after_s:
                        detail = (
                            f"{e.detail} (the server asks to wait {e.wait_s:g} s, more than "
                            f"max_retry_after_s={s.max_retry_after_s:g})"
                        )
                        raise HttpTeacherError(self.endpoint, e.status, detail) from None
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    last = _Retryable(None, repr(e))
                if attempt < s.max_retries:
                    backoff = min(MAX_BACKOFF_S, s.backoff_s * 2**attempt) * random.uniform(0.5, 1)
                    await asyncio.sleep(backoff if last.wait_s is None else last.wait_s)
        detail = f"gave up after {s.max_retries + 1} tries: {last.detail}"
        raise HttpTeacherError(self.endpoint, last.status, detail)

    async def _post(self, session: aiohttp.ClientSession, body: dict, n: int) -> np.ndarray:
        async with session.post(self.endpoint, json=body) as resp:
            text = await resp.text()
            if not 200 <= resp.status < 300:
                if resp.status in RETRY_STATUSES or resp.status >= 500:
                    wait = resp.headers.get("Retry-After") if resp.status in (429, 503) else None
                    raise _Retryable(resp.status, _error_text(text), _retry_after(wait))
                raise HttpTeacherError(self.endpoint, resp.status, _error_text(text))
        return self._parse(text, n)

    def _parse(self, text: str, n: int) -> np.ndarray:
        """Rows in input order by `data[i].index`, which must cover 0..n-1 exactly once."""
        try:
            data = json.loads(text)["data"]
            indices = [item["index"] for item in data]
            if sorted(indices) != list(range(n)):
                detail = f"expected indices 0..{n - 1} once each, got {sorted(indices)[:20]}"
                raise HttpTeacherError(self.endpoint, 200, detail)
            rows = {item["index"]: item["embedding"] for item in data}
            matrix = np.array([rows[i] for i in range(n)], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as e:
            detail = f"malformed response ({e!r}): {text[:200]}"
            raise HttpTeacherError(self.endpoint, 200, detail) from None
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise HttpTeacherError(self.endpoint, 200, f"bad embedding shape {matrix.shape}")
        return matrix
