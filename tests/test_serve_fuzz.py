"""Property-based test of the request schema: random types, sizes, nesting depths and Unicode (lone
surrogates included) in every field of /v1/completions and /v1/chat/completions, plus plausible values
that reach the engine. The property: never a 5xx (streamed or not, no ``server_error`` in a stream),
every 4xx is OpenAI's error body, and the server still answers /health.

The default tier sends a few hundred requests (~10 s); the slow tier a few thousand.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from helpers_serve import TEXT, live_server, tiny_run  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpt.infer.config import ServeConfig  # noqa: E402
from gpt.serve.server import load_for_serving  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# every character, lone surrogates (category Cs) included: json.dumps sends them as \ud800 escapes
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)
VOCAB_TEXT = st.text(st.sampled_from(sorted(set(TEXT))), max_size=30)
TEXT_VALUES = st.one_of(VOCAB_TEXT, ANY_TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT_VALUES)  # fmt: skip
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(TEXT_VALUES, inner, max_size=4), max_leaves=12)  # fmt: skip


def as_json(value) -> str:
    """JSON text of ``value`` (floats as Python writes them: NaN, Infinity, 1e+300 too)."""
    return json.dumps(value)


@st.composite
def deep(draw) -> str:
    """A value nested up to thousands of levels deep, as JSON text (json.dumps would recurse)."""
    depth = draw(st.integers(1, 5000))
    opener = draw(st.sampled_from(["[", '{"k": ']))
    closer = "]" if opener == "[" else "}"
    return opener * depth + as_json(draw(SCALARS)) + closer * depth


def mostly(valid, edge):
    """Valid values three times in four, edge values (of the right type, often out of range) else."""
    return st.sampled_from(range(4)).flatmap(lambda i: edge if i == 0 else valid)  # one_of dedups branches


NUMBER = st.one_of(st.floats(-3, 3), st.integers(-2, 3), st.sampled_from([0, 1e-9, 1e-6, 1e6, 1e9, 2**64]))
COMMON = {
    "max_tokens": mostly(st.integers(1, 4), st.integers()),
    "temperature": mostly(st.floats(0, 2), NUMBER),
    "top_p": mostly(st.floats(0.01, 1), NUMBER),
    "min_p": mostly(st.floats(0, 0.9), NUMBER),
    "top_k": mostly(st.integers(-1, 100), st.integers()),
    "repetition_penalty": mostly(st.floats(0.5, 2), NUMBER),
    "presence_penalty": mostly(st.floats(-2, 2), NUMBER),
    "frequency_penalty": mostly(st.floats(-2, 2), NUMBER),
    "n": mostly(st.integers(1, 3), st.integers(-1, 5)),
    "seed": mostly(st.integers(0, 2**64 - 1), st.integers(-1, 2**64 + 1)),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": mostly(VOCAB_TEXT.filter(bool) | st.lists(VOCAB_TEXT.filter(bool), max_size=3),
                   TEXT_VALUES | st.lists(TEXT_VALUES, max_size=20)),
    "user": ANY_TEXT,
}  # fmt: skip
TOKEN_IDS = st.lists(st.integers(0, 45), min_size=1, max_size=8)
PROMPTS = st.one_of(VOCAB_TEXT, st.lists(VOCAB_TEXT, min_size=1, max_size=3), TOKEN_IDS,
                    st.lists(TOKEN_IDS, min_size=1, max_size=3))  # fmt: skip
COMPLETION = {
    "prompt": mostly(PROMPTS, st.one_of(TEXT_VALUES, st.lists(TEXT_VALUES, max_size=12),
                                        st.lists(st.lists(st.integers(-2, 70), max_size=4), max_size=3))),
    "logprobs": mostly(st.integers(0, 5), st.integers(-1, 6)),
    "echo": st.booleans(),
}  # fmt: skip
TURN = st.fixed_dictionaries({"role": st.just("user"), "content": VOCAB_TEXT.filter(str.strip)})
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT_VALUES})
TOOL = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | ANY_TEXT,
    "content": st.one_of(TEXT_VALUES, st.lists(PART, max_size=3), ANY_JSON),
}, optional={"tool_calls": st.just([CALL]) | ANY_JSON,
             "tool_call_id": st.just("call_1") | ANY_JSON})  # fmt: skip
CHAT = {
    "messages": mostly(st.lists(TURN, min_size=1, max_size=1), st.lists(MESSAGE, max_size=4)),
    "max_completion_tokens": mostly(st.integers(1, 4), st.integers(-1, 6)),
    "logprobs": st.booleans(),
    "top_logprobs": mostly(st.integers(0, 20), st.integers(-1, 21)),
    "tools": mostly(st.just([TOOL]), st.lists(st.just(TOOL) | ANY_JSON, max_size=3) | ANY_JSON),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {
        "name": "calculator"}}]) | ANY_JSON,
    "parallel_tool_calls": st.booleans(),
}  # fmt: skip


@st.composite
def requests(draw) -> tuple[str, bytes]:
    """(path, body): the model and the prompt (mostly valid), some other fields with mostly valid
    values, then often one field of any type, size, nesting depth or Unicode; sometimes an unknown
    field, sometimes a body that is not an object at all."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    spec = {**COMMON, **(CHAT if chat else COMPLETION)}
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return path, draw(st.one_of(ANY_JSON.map(as_json), deep())).encode("utf-8", "surrogatepass")
    if kind == 1:
        return path, draw(st.binary(max_size=64))
    required = "messages" if chat else "prompt"
    items = {
        "model": as_json(
            draw(st.sampled_from(range(8)).flatmap(lambda i: ANY_TEXT if i == 0 else st.just("tiny")))
        ),
        required: as_json(draw(spec[required])),
    }
    for name in draw(st.lists(st.sampled_from(sorted(spec)), max_size=6, unique=True)):
        items[name] = as_json(draw(spec[name]))
    if kind < 10:  # one field of any shape at all
        items[draw(st.sampled_from(sorted(spec)) | ANY_TEXT)] = draw(st.one_of(ANY_JSON.map(as_json), deep()))
    text = "{" + ", ".join(f"{as_json(k)}: {v}" for k, v in items.items()) + "}"
    return path, text.encode("utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    run_dir = tiny_run(tmp_path_factory.mktemp("serve") / "tiny")
    served = load_for_serving(ServeConfig(ckpt=str(run_dir), device="cpu", dtype="fp32"))
    # few tokens per reply: the fuzzer explores requests, not generation
    cfg = ServeConfig(max_batch=8, max_queue=8, max_n=3, max_tokens=4, max_body_bytes=1 << 16)
    with live_server(served.model, served.tokenizer, cfg, name="tiny") as s, httpx.Client(
        base_url=s.url, timeout=60
    ) as client:  # fmt: skip
        yield s, client


def check(client, path: str, body: bytes) -> int:
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:500], body[:300])
    if r.status_code >= 400:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.endswith("data: [DONE]\n\n") and "server_error" not in r.text, r.text[-500:]
    else:
        assert r.json()["choices"]
    return r.status_code


def fuzz(server, examples: int) -> None:
    live, client = server
    statuses: dict[int, int] = {}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(requests())
    def one(request):
        status = check(client, *request)
        statuses[status] = statuses.get(status, 0) + 1

    one()
    assert client.get("/health").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics
    print(f"fuzzed {sum(statuses.values())} requests: {dict(sorted(statuses.items()))}")
    assert len(statuses) > 1, "every request got the same status: the generator explores nothing"


def test_fuzzed_requests_never_get_a_5xx(server):
    fuzz(server, 500)


@pytest.mark.slow
def test_fuzzed_requests_never_get_a_5xx_thousands(server):
    fuzz(server, 3000)
