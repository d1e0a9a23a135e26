"""``gpt serve draft=ngram``: a request alone in the batch decodes speculatively (prompt lookup), through
the official ``openai`` client on a live server: greedy text identical to the plain server's, alone and
while other requests join the batch mid-way, streamed or not, with stop strings and at the context's
end; fewer forwards than tokens where the prompt repeats; a draft model is refused in one line."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt.errors import ConfigError
from gpt.infer.config import ServeConfig

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers_serve import TEXT, live_server  # noqa: E402

QUOTE = TEXT[:40] + "\n" + TEXT[:40] + "\n" + TEXT[:12]  # continuing it repeats what it has just seen
PROMPTS = [QUOTE, "ROMEO: But soft", "JULIET: Ay me", "soft"]


def texts(server, prompts: list[str], max_tokens: int = 30, **kw) -> list[str]:
    """Each prompt's greedy completion, all sent at once (they share the batch as they arrive)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")

    def one(prompt: str) -> str:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_greedy_text_is_the_plain_servers_alone_and_batched(served):
    with live_server(served.model, served.tokenizer, ServeConfig()) as plain:
        want = [texts(plain, [p])[0] for p in PROMPTS]
        want_long = texts(plain, [QUOTE], max_tokens=34)[0]  # up to the 128-token context
        want_stop = texts(plain, [QUOTE], stop=["light"])[0]
    cfg = ServeConfig(draft="ngram", draft_tokens=4, draft_ngram=3)
    with live_server(served.model, served.tokenizer, cfg) as spec:
        stats = spec.service.batcher.stats
        alone = [texts(spec, [p])[0] for p in PROMPTS]
        assert alone == want
        assert stats.steps < stats.completion_tokens - len(PROMPTS)  # drafts were kept: fewer forwards
        assert texts(spec, PROMPTS) == want  # together: rows join and leave a speculating row
        assert texts(spec, [QUOTE], max_tokens=34)[0] == want_long
        assert texts(spec, [QUOTE], stop=["light"])[0] == want_stop
        client = openai.OpenAI(base_url=spec.url + "/v1", api_key="none")
        stream = client.completions.create(
            model="tiny", prompt=QUOTE, max_tokens=30, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in stream) == want[0]
        sampled = [
            client.completions.create(model="tiny", prompt=QUOTE, max_tokens=30, temperature=0.8, seed=3)
            for _ in range(2)
        ]  # the acceptance rule's path, with the request's seeded generator: the same text again
        assert sampled[0].choices[0].text == sampled[1].choices[0].text
        assert 1 <= sampled[0].usage.completion_tokens <= 30


def test_a_draft_model_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="draft=ngram"):
        ServeConfig(draft="out/shakespeare_char")
    with pytest.raises(ConfigError, match="draft_tokens"):
        ServeConfig(draft="ngram", draft_tokens=0)
