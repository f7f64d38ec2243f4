"""A bounded hypothesis fuzz of both generation routes and the admin routes, against a real
gateway and a fake-rate worker: no answer is a 5xx, and afterwards nothing is left in flight.

Integers are drawn past int64 too: there (top_k, stop_token_ids) the body decoder once answered
500 and leaked an in-flight count (issue 14; `test_integers_above_int64_are_400` pins it), and
`chat_template_kwargs` keys include the template's own variables (`messages`, ...), which once
crashed the renderer.
"""

from __future__ import annotations

import json
import string
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from fake_cluster import FakeCluster, post, start_fake_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mell_cluster import metric, wait_until

pytestmark = pytest.mark.slow
INTS = (
    st.integers(-(2**63), 2**63 - 1)
    | st.integers(2**63, 2**70)
    | st.integers(-(2**70), -(2**63) - 1)
)
SMALL = st.integers(-3, 10)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.none() | st.booleans() | INTS | SMALL | st.floats() | st.text(max_size=12)
anything = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values, one time in eight anything at all."""
    return st.integers(0, 7).flatmap(lambda i: anything if i == 0 else valid)


COMMON = {
    "model": field(st.sampled_from(["mell-tiny", "mell-tiny", "", "nope"])),
    "max_tokens": field(st.integers(1, 6)),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0, 1)),
    "top_k": field(st.integers(-2, 600)),
    "seed": field(INTS),
    "stop": field(st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5)),
    "stop_token_ids": field(st.lists(st.integers(-2, 600), max_size=4)),
    "ignore_eos": field(st.booleans()),
    "stream": field(st.booleans()),
    "stream_options": field(st.none() | st.fixed_dictionaries({"include_usage": st.booleans()})),
    "n": field(st.sampled_from([1, 1, 1, 0, 2])),
    "presence_penalty": field(st.floats(-3, 3)),
    "frequency_penalty": field(st.floats(-3, 3)),
    "logit_bias": field(st.dictionaries(st.integers(0, 600).map(str), st.floats(-100, 100))),
    "user": field(st.text(max_size=5)),
}
COMPLETION = {
    **COMMON,
    "prompt": field(
        st.text(min_size=1, max_size=40)
        | st.lists(st.integers(-1, 600), min_size=1, max_size=12)
        | st.lists(st.text(max_size=5), max_size=3)
    ),
    "logprobs": field(st.integers(-1, 25)),
    "echo": field(st.booleans()),
    "suffix": field(st.text(max_size=3)),
}
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "x"])},
    optional={
        "content": st.text(max_size=30)
        | st.lists(
            st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=8)}
            ),
            max_size=2,
        ),
        "name": st.text(max_size=5),
    },
)
CHAT = {
    **COMMON,
    "messages": field(st.lists(message, min_size=1, max_size=3)),
    "max_completion_tokens": field(st.integers(1, 6)),
    "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(-1, 25)),
    "add_generation_prompt": field(st.booleans()),
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(
            [
                "enable_thinking",
                "foo",
                "messages",
                "add_generation_prompt",
                "bos_token",
                "eos_token",
            ]
        ),
        scalars,
        max_size=2,
    ),
}


def bodies(fields: dict[str, st.SearchStrategy[Any]], needed: str) -> st.SearchStrategy[Any]:
    """Bodies of the route's shape (with `needed`, usually), JSON of any shape, or bytes."""
    optional = {k: v for k, v in fields.items() if k != needed}
    shaped = st.fixed_dictionaries({needed: fields[needed]}, optional=optional)
    loose = st.fixed_dictionaries({}, optional=fields)
    return st.integers(0, 9).flatmap(
        lambda i: [anything, st.binary(max_size=40), loose][i] if i < 3 else shaped
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeCluster]:
    c = start_fake_cluster(tmp_path_factory.mktemp("fuzz"), rate=1000.0)
    yield c
    c.stop()


def _encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode()  # NaN and Infinity go out as the invalid JSON they are


SEEN: Counter[tuple[str, int]] = Counter()  # (route, status) of every fuzzed request


def _check(status: int, answer: Any, what: Any, route: str) -> None:
    SEEN[route, status] += 1
    assert status < 500, (status, answer, what)


@FUZZ
@given(body=bodies(COMPLETION, "prompt"))
def test_fuzz_completions(cluster: FakeCluster, body: Any) -> None:
    status, answer = post(cluster, "/v1/completions", _encode(body))
    _check(status, answer, body, "completions")


@FUZZ
@given(body=bodies(CHAT, "messages"))
def test_fuzz_chat_completions(cluster: FakeCluster, body: Any) -> None:
    status, answer = post(cluster, "/v1/chat/completions", _encode(body))
    _check(status, answer, body, "chat")


ids = st.text(string.ascii_letters + string.digits + "-_.%~ ", min_size=1, max_size=12).filter(
    lambda s: s.strip() not in ("w0", "")  # draining the only worker makes later requests 503
)
query = st.dictionaries(
    st.sampled_from(["tail", "worker", "request", "follow", "to", "kind"]),
    st.text(max_size=6) | INTS.map(str) | st.just(str(10**24)),
    max_size=3,
)


def _admin(cluster: FakeCluster, method: str, path: str, q: dict[str, str], body: Any) -> None:
    url = f"{cluster.admin_url}/admin/v1/{path}"
    if q:
        q = {**q, "follow": "0"}  # a follower stays open by design
        url += "?" + urllib.parse.urlencode(q)
    request = urllib.request.Request(
        url,
        data=_encode(body) if method == "POST" else None,
        method=method,
        headers={"Authorization": f"Bearer {cluster.admin_token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    _check(status, raw[:300], (method, url, body), "admin")
    if status == 200 and path == "events":
        for line in raw.splitlines():
            assert "error" not in json.loads(line)  # the whole answer is events


@FUZZ
@given(
    route=st.sampled_from(
        [
            ("GET", "status"),
            ("GET", "workers"),
            ("GET", "workers/{}"),
            ("GET", "requests"),
            ("GET", "events"),
            ("POST", "workers/{}/drain"),
            ("POST", "workers/{}/undrain"),
            ("POST", "requests/{}/migrate"),
        ]
    ),
    some_id=ids,
    q=query,
    body=st.none() | anything,
)
def test_fuzz_admin(cluster: FakeCluster, route: tuple[str, str], some_id: str, q, body) -> None:
    method, path = route
    _admin(cluster, method, path.format(urllib.parse.quote(some_id, safe="")), q, body)


def test_nothing_left_in_flight_after_the_fuzz(cluster: FakeCluster) -> None:
    def in_flight() -> float:
        with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as response:
            return metric(response.read().decode(), "mell:num_requests_in_flight")

    def load() -> int:
        with urllib.request.urlopen(cluster.url + "/load", timeout=10) as response:
            return int(json.loads(response.read())["server_load"])

    for route in ("completions", "chat"):  # the fuzz reached the workers, not only the decoder
        if any(r == route for r, _ in SEEN):  # (this test run alone: no fuzz before it)
            assert SEEN[route, 200] >= 10, SEEN
    wait_until(lambda: load() == 0 and in_flight() == 0, 20.0, "in-flight count back to 0")
    status, _ = post(cluster, "/v1/completions", {"prompt": "still serving", "max_tokens": 2})
    assert status == 200


@pytest.mark.parametrize(
    "extra", [{"top_k": 2**70}, {"stop_token_ids": [2**70]}], ids=["top_k", "stop_token_ids"]
)
def test_integers_above_int64_are_400(cluster: FakeCluster, extra: dict[str, Any]) -> None:
    status, answer = post(cluster, "/v1/completions", {"prompt": "hi", "max_tokens": 1, **extra})
    assert status == 400, answer


def test_body_larger_than_any_prompt_is_413(cluster: FakeCluster) -> None:
    """mell-tiny alone: the longest prompt is 53,248 characters, the body limit 6 bytes a
    character of it plus 1 MiB; a 2 MB body is refused as it is read."""
    status, answer = post(cluster, "/v1/completions", b'{"prompt": "' + b"a" * 2_000_000 + b'"}')
    assert status == 413, answer
    assert answer["error"]["code"] == 413
