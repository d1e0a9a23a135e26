"""``gpt serve draft=ngram``: a request alone in the batch decodes speculatively (prompt lookup), through
the official ``openai`` client on a live server: greedy text identical to the plain server's, alone and
while other requests join the batch mid-way, streamed or not, with stop strings and at the context's
end; fewer forwards than tokens where the prompt repeats; the same with a draft model (``draft=RUN``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt.errors import CheckpointError, ConfigError
from gpt.infer.config import ServeConfig

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers_serve import TEXT, live_server  # noqa: E402

from gpt.serve.app import create_app  # noqa: E402

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


def test_a_draft_model_gives_the_plain_servers_text(served, serve_run, tmp_path):
    """draft=RUN: the model drafting for itself has every draft kept (its own cache follows each new
    request); a weaker model (fewer training steps, same tokenizer) has some refused; the text is the
    plain server's either way, and a seeded sample is the same twice."""
    from helpers_serve import tiny_run

    with live_server(served.model, served.tokenizer, ServeConfig()) as plain:
        want = [texts(plain, [p])[0] for p in PROMPTS]
    weak = tiny_run(tmp_path / "weak", steps=40)
    for draft in (str(serve_run), str(weak)):
        cfg = ServeConfig(draft=draft, draft_tokens=4)
        with live_server(served.model, served.tokenizer, cfg) as spec:
            stats = spec.service.batcher.stats
            assert [texts(spec, [p])[0] for p in PROMPTS] == want
            if draft == str(serve_run):  # 4 drafts kept per forward, the bonus token after them
                assert stats.steps <= stats.completion_tokens / 4 + 2 * len(PROMPTS)
            assert texts(spec, PROMPTS) == want  # batched rows decode plainly; the drafter catches up
            client = openai.OpenAI(base_url=spec.url + "/v1", api_key="none")
            sampled = [
                client.completions.create(model="tiny", prompt=QUOTE, max_tokens=30, temperature=0.8, seed=3)
                for _ in range(2)
            ]  # q of the draft model in the acceptance rule; the request's seeded generator
            assert sampled[0].choices[0].text == sampled[1].choices[0].text


def test_bad_draft_settings_are_one_line(served, tmp_path):
    with pytest.raises(ConfigError, match="draft_tokens"):
        ServeConfig(draft="ngram", draft_tokens=0)
    with pytest.raises(CheckpointError, match="nosuch"):
        create_app(served.model, served.tokenizer, ServeConfig(draft=str(tmp_path / "nosuch")), "tiny", True)
