"""HttpEmbedder against a real local OpenAI-style server that can be told to misbehave."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from leaf_ray.config import HttpTeacherConfig
from leaf_ray.teacher.http import HttpEmbedder, HttpTeacherError

DIM = 16
# A policy sees a request's texts and how many times this batch was tried (1, 2, ...), and may
# sleep, return a response to send instead of embeddings, or return None for the normal answer.
Policy = Callable[[list[str], int], Awaitable[web.Response | None]]


def vector(text: str) -> np.ndarray:
    """The server's deterministic embedding: sha256 bytes as 16 numbers in [0, 1]."""
    return np.frombuffer(hashlib.sha256(text.encode()).digest(), dtype=">u2") / 65535.0


def expected(texts: list[str], dim: int = DIM) -> np.ndarray:
    return np.stack([vector(t)[:dim] for t in texts]).astype(np.float32)


class FakeServer:
    def __init__(self) -> None:
        self.url = ""
        self.policy: Policy | None = None
        self.shuffle = False
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.statuses: Counter[int] = Counter()
        self.auth: list[str | None] = []
        self.bodies: list[dict] = []
        self.embed: Callable[[list[str]], np.ndarray] | None = None  # instead of `vector`
        self._tries: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.json()
            self.bodies.append(body)
            self.auth.append(request.headers.get("Authorization"))
            texts = body["input"]
            self._tries[texts[0]] += 1
            response = await self.policy(texts, self._tries[texts[0]]) if self.policy else None
            if response is None:
                dim = body.get("dimensions") or DIM
                vectors = self.embed(texts) if self.embed else [vector(t)[:dim] for t in texts]
                data = [
                    {"object": "embedding", "index": i, "embedding": v.tolist()}
                    for i, v in enumerate(vectors)
                ]
                if self.shuffle:
                    random.Random(self.requests).shuffle(data)
                response = web.json_response({"object": "list", "data": data})
            self.statuses[response.status] += 1
            return response
        finally:
            self.in_flight -= 1


@pytest.fixture
def server():
    fake = FakeServer()
    app = web.Application()
    app.router.add_post("/v1/embeddings", fake.handle)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}/v1/"  # trailing slash: the client must strip it
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield fake
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def embedder(server: FakeServer, api_key: str | None = None, **overrides) -> HttpEmbedder:
    config = HttpTeacherConfig(url=server.url, **{"backoff_s": 0.01, **overrides})
    return HttpEmbedder(config, "teacher", api_key)


def texts(n: int) -> list[str]:
    return [f"text {i}" for i in range(n)]


def error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=headers)


def test_rows_in_input_order_across_requests_even_when_shuffled(server):
    server.shuffle = True
    inputs = texts(150)
    out = embedder(server, texts_per_request=16).embed(inputs)
    assert out.dtype == np.float32 and out.shape == (150, DIM)
    np.testing.assert_array_equal(out, expected(inputs))
    assert server.requests == 10  # ceil(150 / 16)
    assert sorted(len(b["input"]) for b in server.bodies) == [6] + [16] * 9
    assert all(b["model"] == "teacher" and b["encoding_format"] == "float" for b in server.bodies)
    assert all("dimensions" not in b for b in server.bodies)


def test_dimensions_sent_and_respected(server):
    out = embedder(server, dimensions=8).embed(texts(5))
    assert [b["dimensions"] for b in server.bodies] == [8]
    np.testing.assert_array_equal(out, expected(texts(5), dim=8))


def test_repeated_calls_from_one_thread_leak_no_session(server):
    client = embedder(server, texts_per_request=4)
    for n in (3, 9, 1):
        np.testing.assert_array_equal(client.embed(texts(n)), expected(texts(n)))
    assert client.embed([]).shape == (0, 0)
    gc.collect()
    open_sessions = [
        o for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed
    ]
    assert open_sessions == []


def test_transient_500_and_429_are_retried_to_a_complete_result(server):
    async def flaky(batch: list[str], tries: int) -> web.Response | None:
        k = int(batch[0].split()[1]) // 16  # batch number
        if tries == 1 and k % 3 == 0:
            return error(500, "overloaded")
        if tries == 1 and k % 3 == 1:
            return error(429, "slow down", **{"Retry-After": "0.1"})
        return None

    server.policy, server.shuffle = flaky, True
    inputs = texts(150)
    out = embedder(server, texts_per_request=16).embed(inputs)
    np.testing.assert_array_equal(out, expected(inputs))
    # Batches 0, 3, 6, 9 got a 500 and 1, 4, 7 a 429 once; every batch succeeded once.
    assert server.statuses == Counter({200: 10, 500: 4, 429: 3})
    assert server.requests == 17


def test_retry_after_overrides_a_long_backoff(server):
    async def once_429(batch: list[str], tries: int) -> web.Response | None:
        return error(429, "slow down", **{"Retry-After": "0.1"}) if tries == 1 else None

    server.policy = once_429
    start = time.monotonic()
    out = embedder(server, backoff_s=10.0).embed(texts(3))
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(out, expected(texts(3)))
    assert server.requests == 2
    assert 0.1 <= elapsed < 4.0  # our own backoff would have slept >= 5 s


def test_a_retry_after_beyond_the_limit_fails_at_once(server):
    async def quota_spent(batch: list[str], tries: int) -> web.Response | None:
        return error(429, "daily quota exceeded", **{"Retry-After": "3600"})

    server.policy = quota_spent
    start = time.monotonic()
    with pytest.raises(
        HttpTeacherError,
        match=r"HTTP 429: daily quota exceeded \(the server "
        r"asks to wait 3600 s, more than max_retry_after_s=120\)",
    ):
        embedder(server).embed(texts(3))
    assert server.requests == 1 and time.monotonic() - start < 5


def test_timeouts_are_retried(server):
    async def slow_first(batch: list[str], tries: int) -> web.Response | None:
        if tries == 1:
            await asyncio.sleep(0.5)
        return None

    server.policy = slow_first
    out = embedder(server, timeout_s=0.2).embed(texts(4))
    np.testing.assert_array_equal(out, expected(texts(4)))
    assert server.requests == 2


def test_concurrency_is_bounded(server):
    async def slow(batch: list[str], tries: int) -> web.Response | None:
        await asyncio.sleep(0.05)
        return None

    server.policy = slow
    inputs = texts(20)
    out = embedder(server, texts_per_request=1, max_concurrency=4).embed(inputs)
    np.testing.assert_array_equal(out, expected(inputs))
    assert 1 < server.max_in_flight <= 4


def test_rate_limit_spaces_requests(server):
    client = embedder(server, texts_per_request=1, requests_per_second=20)
    start = time.monotonic()
    client.embed(texts(10))
    assert server.requests == 10
    assert time.monotonic() - start >= 0.4  # 10 requests at 20/s: the last starts at 0.45 s


def test_401_fails_at_once_naming_status_and_message(server):
    async def deny(batch: list[str], tries: int) -> web.Response | None:
        return error(401, "Incorrect API key provided")

    server.policy = deny
    with pytest.raises(HttpTeacherError) as info:
        embedder(server).embed(texts(3))
    assert server.requests == 1
    assert info.value.status == 401
    message = str(info.value)
    assert "401" in message and "Incorrect API key provided" in message
    assert "/v1/embeddings" in message


def test_persistent_500_gives_up_after_max_retries(server):
    async def broken(batch: list[str], tries: int) -> web.Response | None:
        return web.Response(status=500, text="internal meltdown")

    server.policy = broken
    with pytest.raises(HttpTeacherError) as info:
        embedder(server, max_retries=3).embed(texts(3))
    assert server.requests == 4
    assert info.value.status == 500
    assert "500" in str(info.value) and "internal meltdown" in str(info.value)


ROW = [1.0, 2.0]


@pytest.mark.parametrize(
    "data, complaint",
    [
        ([{"index": 0, "embedding": ROW}, {"index": 0, "embedding": ROW}], "indices"),
        ([{"index": 0, "embedding": ROW}], "indices"),
        ([{"index": i, "embedding": ROW} for i in range(3)], "indices"),
        ([{"index": 0, "embedding": ROW}, {"index": 1, "embedding": [1.0]}], "malformed"),
        ([{"index": 0, "embedding": ROW}, {"index": 1}], "malformed"),
        ({"oops": 1}, "malformed"),
    ],
    ids=["duplicate-index", "missing-row", "extra-row", "ragged", "no-embedding", "not-a-list"],
)
def test_malformed_responses_raise(server, data, complaint):
    async def bad(batch: list[str], tries: int) -> web.Response | None:
        return web.json_response({"data": data})

    server.policy = bad
    with pytest.raises(HttpTeacherError, match=f"/v1/embeddings.*{complaint}"):
        embedder(server).embed(texts(2))
    assert server.requests == 1


def test_inconsistent_dimension_across_requests_raises(server):
    async def shrinking(batch: list[str], tries: int) -> web.Response | None:
        dim = 16 if batch[0] == "text 0" else 8
        data = [{"index": i, "embedding": vector(t)[:dim].tolist()} for i, t in enumerate(batch)]
        return web.json_response({"data": data})

    server.policy = shrinking
    with pytest.raises(HttpTeacherError, match="inconsistent embedding dimensions"):
        embedder(server, texts_per_request=2).embed(texts(4))


def test_api_key_sent_as_bearer(server):
    embedder(server, api_key="sk-test").embed(texts(2))
    assert server.auth == ["Bearer sk-test"]
    server.auth.clear()
    embedder(server).embed(texts(2))
    assert server.auth == [None]


def test_http_teacher_is_evaluated_through_its_endpoint(server, tiny_teacher, tmp_path, ray_local):
    """The same model behind the endpoint and on disk scores the same (the endpoint is asked
    for every query and document once); a second evaluation asks the endpoint nothing."""
    from sentence_transformers import SentenceTransformer

    from leaf_ray.config import EvalConfig, TeacherConfig
    from leaf_ray.eval.models import EvalModel
    from leaf_ray.eval.runner import evaluate
    from leaf_ray.storage import Location
    from tests.integration.test_pipeline import small_eval_set

    served = SentenceTransformer(str(tiny_teacher), device="cpu")
    server.embed = lambda texts: served.encode(texts)
    cfg = EvalConfig(datasets=[str(small_eval_set(tmp_path / "beir"))], max_seq_length=64)
    endpoint = TeacherConfig(model="tiny", http={"url": server.url, "texts_per_request": 50})
    over_http = {"teacher": EvalModel("api/tiny", "tiny", None, {}, endpoint)}
    on_disk = {"teacher": EvalModel("local/tiny", str(tiny_teacher))}
    cache = Location.of(tmp_path / "eval_cache")

    first = evaluate(over_http, cfg, cache, "http")
    texts_sent = sum(len(body["input"]) for body in server.bodies)
    assert first.embedded == {"teacher": 360} and texts_sent == 360  # 60 queries, 300 documents
    local = evaluate(on_disk, cfg, cache, "disk")
    assert local.embedded == {"teacher": 360}  # its own key: another model
    (http_row,), (disk_row,) = first.rows, local.rows
    assert http_row["model"] == "api/tiny" and http_row["mode"] == "teacher"
    assert http_row["score"] == pytest.approx(disk_row["score"], abs=1e-4)
    assert disk_row["score"] > 0.3  # a real ranking, not noise

    again = evaluate(over_http, cfg, cache, "http")
    assert again.embedded == {"teacher": 0}
    assert sum(len(body["input"]) for body in server.bodies) == texts_sent
