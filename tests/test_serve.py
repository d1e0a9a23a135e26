"""The server through the official ``openai`` client against a live server on a loopback port, with a
tiny char-level model: completions and chat, streamed and not, n, seed, stop, logprobs, usage and
finish_reason; temperature 0 equal to sample.py; and greedy output the same alone or in a batch."""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers_serve import live_server  # noqa: E402

from gpt.chat_template import render_prompt  # noqa: E402
from gpt.checkpoint import checkpoint_state, save_checkpoint  # noqa: E402
from gpt.infer.config import GenerationConfig, ServeConfig  # noqa: E402
from gpt.infer.engine import Decoder  # noqa: E402
from gpt.infer.generate import generate  # noqa: E402
from gpt.infer.sample import sample  # noqa: E402
from gpt.interop.hf import export_hf  # noqa: E402
from gpt.lora import adapter_weights, apply_lora  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from gpt.runs.load import base_location, load, weights_fingerprint  # noqa: E402
from gpt.serve.batcher import Batcher, Done, Failed, Piece, Request  # noqa: E402
from gpt.serve.server import load_for_serving  # noqa: E402
from gpt.tokenizer_load import gpt2_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["ROMEO:", "JULIET: Ay", "soft", "w", "But soft, what light"]


@pytest.fixture(scope="module")
def server(served):
    with live_server(served.model, served.tokenizer, ServeConfig(max_batch=8), name=served.name) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy_ids(served, prompt_ids, n_tokens):
    cfg = GenerationConfig(max_new_tokens=n_tokens, temperature=0.0, top_k=0)
    return generate(served.model, served.tokenizer, prompt_ids, cfg)[0]


def test_models_lists_the_served_model(client, served):
    assert [m.id for m in client.models.list().data] == [served.name] == ["tiny"]


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("batched_prefill", [False, True])
def test_ragged_cache_gives_the_logits_of_one_row_decoding(pos_emb, batched_prefill):
    """Rows of different lengths (prefilled one by one, or as one right-padded batch) decoded
    together: each row's logits equal those of its own forward over its whole sequence."""
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64, pos_emb=pos_emb)
    ).eval()
    prompts = [torch.randint(0, 64, (1, n)) for n in (3, 9, 5)]
    decoder = Decoder(model, 4)
    with torch.no_grad():
        if batched_prefill:
            padded = torch.zeros(3, 9, dtype=torch.long)
            for i, p in enumerate(prompts):
                padded[i, : p.size(1)] = p[0]
            first = decoder.add(padded, [p.size(1) for p in prompts])
        else:
            first = torch.cat([decoder.add(p, [p.size(1)]) for p in prompts])
        for i, p in enumerate(prompts):
            torch.testing.assert_close(first[i], model(p)[0, -1], rtol=1e-5, atol=1e-5)
        for step in range(3):
            nxt = torch.tensor([3 + step, 4, 5 + step])
            batched = decoder.step(nxt)
            assert decoder.cache.attn_mask is not None  # rows of different lengths: a mask per row
            prompts = [torch.cat([p, nxt[i : i + 1, None]], dim=1) for i, p in enumerate(prompts)]
            for i, p in enumerate(prompts):
                torch.testing.assert_close(batched[i], model(p)[0, -1], rtol=1e-5, atol=1e-5)
    assert decoder.lengths[:3] == [p.size(1) for p in prompts]


def test_completion_usage_and_length(client, served):
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=7, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(served.tokenizer.encode("ROMEO:"))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    ids = greedy_ids(served, served.tokenizer.encode("ROMEO:"), 7)
    assert choice.text == served.tokenizer.decode(ids)


def test_temperature_zero_equals_sample_py(client, serve_run):
    cfg = {
        "ckpt": str(serve_run),
        "prompt": "JULIET: Ay",
        "temperature": 0.0,
        "max_new_tokens": 30,
        "echo_prompt": False,
        "device": "cpu",
        "dtype": "fp32",  # as the served fixture: the same precision, the same greedy text
        "seed": 5,
        "history_file": None,
    }
    out, err = io.StringIO(), io.StringIO()
    sample(cfg, out=out, err=err)
    expected = out.getvalue()[:-1]  # print_samples ends the sample with a newline
    expected = expected.split("<|endoftext|>")[0]  # the server stops at <|endoftext|>
    r = client.completions.create(model="tiny", prompt="JULIET: Ay", max_tokens=30, temperature=0, seed=99)
    assert r.choices[0].text == expected and len(expected) > 5


def test_stream_equals_non_stream_and_ends_with_done(server, client):
    full = client.completions.create(model="tiny", prompt="soft", max_tokens=20, temperature=0)
    pieces, reasons = [], []
    for chunk in client.completions.create(
        model="tiny", prompt="soft", max_tokens=20, temperature=0, stream=True
    ):
        assert chunk.object == "text_completion"
        pieces.append(chunk.choices[0].text)
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == full.choices[0].text
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}
    body = {"model": "tiny", "prompt": "soft", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_stream_and_not(client, served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    prompt = render_prompt(served.tokenizer, messages)
    assert r.usage.prompt_tokens == len(prompt)
    ids = greedy_ids(served, prompt, 40)
    eot_turn = served.tokenizer.special_id("<|end_of_turn|>")
    assert eot_turn in ids, "the trained tiny model ends its turn"
    reply = ids[: ids.index(eot_turn)]
    # the reply as written: the space after "Assistant:" (the first token's) is not part of it
    assert served.tokenizer.decode(reply).startswith(" ") and not choice.message.content.startswith(" ")
    assert choice.message.content == served.tokenizer.decode(reply)[1:] and choice.finish_reason == "stop"
    assert r.usage.completion_tokens == len(reply) + 1  # the end-of-turn token is generated too
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_n_and_seed(client):
    kw = dict(model="tiny", prompt="ROMEO:", max_tokens=16, temperature=2.0, n=3, seed=11)
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)], "same seed, same text"
    assert len(set(texts)) > 1, "the choices are different samples"
    # a char-level model: one token per character, plus the <|endoftext|> that ended a choice
    used = sum(16 if c.finish_reason == "length" else len(c.text) + 1 for c in first.choices)
    assert first.usage.completion_tokens == used
    other = client.completions.create(**{**kw, "seed": 12})
    assert [c.text for c in other.choices] != texts
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say ay."}],
        n=3,
        seed=4,
        max_tokens=10,
        temperature=1.0,
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_stop_strings_cut_text_streamed_or_not(client, served):
    full = (
        client.completions.create(model="tiny", prompt="soft", max_tokens=30, temperature=0).choices[0].text
    )
    stop = full[10:13]
    expected = full[: full.index(stop)]
    r = client.completions.create(
        model="tiny", prompt="soft", max_tokens=30, temperature=0, stop=[stop, "zz"]
    )
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="soft", max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == expected


def test_logprobs_on_completions_and_chat(client):
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert (
            len(top) == 3 and chosen <= 0 and chosen == pytest.approx(max(top.values()))
        )  # greedy: the best
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    c = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Who is Juliet?"}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    # the tokens as the model saw them: the first opens with the space after "Assistant:"
    assert "".join(t.token for t in content) == " " + c.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_extras_and_penalties_are_accepted(client):
    r = client.completions.create(
        model="tiny",
        prompt="ROMEO:",
        max_tokens=12,
        temperature=0.7,
        seed=3,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3},
    )
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    plain = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0)
    penalised = client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, extra_body={"repetition_penalty": 5.0}
    )
    assert penalised.choices[0].text != plain.choices[0].text


def test_prompt_list_gives_n_choices_per_prompt(client, served):
    r = client.completions.create(model="tiny", prompt=["ROMEO:", "soft"], max_tokens=5, temperature=0, n=2)
    texts = {c.index: c.text for c in r.choices}
    assert sorted(texts) == [0, 1, 2, 3] and texts[0] == texts[1] and texts[2] == texts[3]
    assert texts[0] == served.tokenizer.decode(greedy_ids(served, served.tokenizer.encode("ROMEO:"), 5))
    ids = served.tokenizer.encode("soft")
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == texts[2]


def test_greedy_output_is_the_same_alone_or_in_a_batch(client, server):
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=25, temperature=0).choices[0].text
        for p in PROMPTS
    ]
    prefills_before = server.service.batcher.stats.prefill_forwards
    server.service.batcher.pause()  # every request joins before the first step, then they run together

    def ask(i):
        if i % 2:  # sampled neighbours with their own settings share the batch
            return (
                client.completions.create(
                    model="tiny",
                    prompt=PROMPTS[i // 2 % len(PROMPTS)],
                    max_tokens=9,
                    temperature=1.0,
                    top_p=0.9,
                    n=2,
                )
                .choices[0]
                .text
            )
        return (
            client.completions.create(model="tiny", prompt=PROMPTS[i // 2], max_tokens=25, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(ask, i) for i in range(10)]
        deadline = time.monotonic() + 10
        while server.service.batcher.queue_depth < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.service.batcher.resume()
        batched = [f.result() for f in futures]
    assert batched[0::2] == alone
    assert server.service.batcher.stats.prefill_forwards - prefills_before < 10, "prompts prefilled together"
    assert server.service.batcher.stats.step_rows / server.service.batcher.stats.steps > 1


def test_metrics_and_health(server, client):
    client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "gpt_requests_total",
        "gpt_prompt_tokens_total",
        "gpt_completion_tokens_total",
        "gpt_tokens_per_second",
        "gpt_queue_depth",
        "gpt_batch_occupancy",
    ):
        assert f"# TYPE {name} " in text
    assert 'gpt_requests_total{endpoint="completions"}' in text
    assert "gpt_batch_occupancy 0" in text
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    assert json.loads(httpx.get(server.url + "/v1/models").text)["data"][0]["max_model_len"] == 128


def test_loads_a_lora_run_and_an_hf_directory(serve_run, tmp_path):
    """A LoRA run is served with its adapters applied; an hf:DIR directory as exported."""
    loaded = load(serve_run)
    base_model, lora_model, tok = loaded.build(), loaded.build(), loaded.tokenizer
    spec = {
        "rank": 2,
        "alpha": 4.0,
        "dropout": 0.0,
        "targets": ["c_attn"],
        "base": str(serve_run),
        "base_path": base_location(str(serve_run)),
        "base_fingerprint": weights_fingerprint(base_model.state_dict()),
    }
    apply_lora(lora_model, 2, 4.0, 0.0, ["c_attn"])
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.5)  # adapters that change the output
    state = checkpoint_state(
        adapter_weights(lora_model.state_dict()), lora_model.config, tok.to_state(), lora=spec
    )
    save_checkpoint(tmp_path / "lora" / "ckpt.pt", state)
    served = load_for_serving(ServeConfig(ckpt=str(tmp_path / "lora"), device="cpu", dtype="fp32"))
    ids = torch.tensor([tok.encode("ROMEO: But")])
    with torch.no_grad():
        expected = lora_model.eval()(ids)
        torch.testing.assert_close(served.model(ids), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(base_model.eval()(ids), expected, atol=1e-3)
    assert served.name == "lora"

    torch.manual_seed(0)
    gpt2 = gpt2_tokenizer()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=50304)).eval()
    export_hf(model, gpt2, tmp_path / "hfmodel")
    served = load_for_serving(ServeConfig(ckpt=f"hf:{tmp_path / 'hfmodel'}", device="cpu", dtype="fp32"))
    assert served.name == "hfmodel" and not served.chat_trained
    ids = torch.tensor([gpt2.encode("Hello, world")])
    with torch.no_grad():
        torch.testing.assert_close(
            served.model(ids)[..., :50257], model(ids)[..., :50257], rtol=1e-4, atol=1e-4
        )


def test_a_failing_prefill_fails_its_request_only(served):
    """The batcher without HTTP: a prompt the model cannot take fails alone; a request decoding
    meanwhile finishes with the same text as generate()."""
    tok = served.tokenizer
    batcher = Batcher(served.model, tok, max_batch=4)
    ok_events, bad_events = [], []
    settings = GenerationConfig(max_new_tokens=30, temperature=0.0, top_k=0)
    batcher.start()
    try:
        batcher.submit(Request(tok.encode("ROMEO:"), settings, emit=ok_events.append))
        batcher.submit(Request([1] * 500, settings, emit=bad_events.append))  # longer than the context
        deadline = time.monotonic() + 30
        while not (ok_events and isinstance(ok_events[-1], Done)) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.stop()
    assert (
        len(bad_events) == 1 and isinstance(bad_events[0], Failed) and "block_size" in bad_events[0].message
    )
    text = "".join(e.text for e in ok_events if isinstance(e, Piece))
    ids = greedy_ids(served, tok.encode("ROMEO:"), 30)
    assert text == tok.decode(ids).split("<|endoftext|>")[0]
    assert batcher.occupancy == 0 and batcher.decoder.rows == 0
