"""Tests of gpt.infer.engine, gpt.infer.sampling and gpt.infer.generate: the KV cache against full
recompute, every sampling control, beam search, stop strings, seeds, and streamed text (UTF-8 never
split). Tiny random models: the point is that the engine computes the same thing as the plain
forward, not that the text is good."""

import pytest
import torch
import torch.nn.functional as F

from gpt.errors import ConfigError
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder
from gpt.infer.generate import Generation, beam_search, generate, generate_text, sample_batch
from gpt.infer.sampling import TextStream, apply_penalties, choose_next
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"


class ByteTokenizer:
    """A stand-in byte-level tokenizer: id = byte value, 256 = <|endoftext|>. Multi-byte characters
    span several tokens, which is what the UTF-8 streaming tests need."""

    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer([TEXT])


def tiny(pos_emb="learned", block_size=24, vocab_size=64, seed=0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size,
                    pos_emb=pos_emb, bias=pos_emb == "learned")  # fmt: skip
    return GPT(cfg).eval()


def greedy(**kw) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, top_k=0, **kw)


def sampled(**kw) -> GenerationConfig:
    return GenerationConfig(**{"temperature": 1.0, "top_k": 0, "seed": 5, **kw})


@torch.no_grad()
def sliding_window_greedy(model: GPT, rows: torch.Tensor, steps: int) -> torch.Tensor:
    """The reference: re-run the last block_size tokens each step (nanoGPT's loop)."""
    ids = rows
    for _ in range(steps):
        logits = model(ids[:, -model.config.block_size :])[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, rows.size(1) :]


@torch.no_grad()
def total_logprob(model: GPT, prompt: list[int], ids: list[int], vocab_size: int) -> float:
    """log p(ids | prompt), normalised over the tokenizer's tokens (not the padded rows)."""
    full = torch.tensor([prompt + ids])
    logp = F.log_softmax(model(full)[0, :-1, :vocab_size].float(), dim=-1)
    return logp[len(prompt) - 1 :].gather(1, full[0, len(prompt) :, None]).sum().item()


# --- the KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_cached_decoder_matches_recompute_batched_across_overflow(pos_emb):
    model = tiny(pos_emb, block_size=16)
    prompts = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))  # 3 distinct rows
    steps = 30  # 10 + 30 tokens > 16: the window slides many times
    expected = sliding_window_greedy(model, prompts, steps)
    decoder = Decoder(model, batch_size=3, context_shift=1)  # shift 1 = exactly nanoGPT's window
    got = []
    with torch.inference_mode():
        logits = decoder.prefill(prompts)
        for step in range(steps):
            next_ids = logits.argmax(-1)
            got.append(next_ids)
            if step + 1 < steps:
                logits = decoder.step(next_ids)
    assert decoder.refills > 0
    assert torch.equal(torch.stack(got, dim=1), expected)


@torch.no_grad()
def windowed_reference(model: GPT, prompt: list[int], forced: torch.Tensor, shift: int) -> list[torch.Tensor]:
    """Logits (B, V) after the prompt and after each forced token, by plain forwards of the documented
    window: when block_size + 1 tokens would be in context, the oldest `shift` are dropped."""
    block_size = model.config.block_size
    windows = [list(prompt) for _ in range(forced.size(0))]
    out = [model(torch.tensor(windows))[:, -1]]
    for column in forced.T.tolist():
        for window, token in zip(windows, column, strict=True):
            window.append(token)
            if len(window) > block_size:
                del window[:shift]
        out.append(model(torch.tensor(windows))[:, -1])
    return out


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("shift", [1, 4, 16])
def test_cached_logits_match_the_documented_window(pos_emb, shift):
    """A shared one-row prefill copied to 3 rows, then 3 different token streams: every row's logits
    at every step (30 steps, several re-fills) equal a plain forward over the same window."""
    model = tiny(pos_emb, block_size=16)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 64, (10,), generator=gen).tolist()
    forced = torch.randint(0, 64, (3, 30), generator=gen)
    expected = windowed_reference(model, prompt, forced, shift)
    decoder = Decoder(model, batch_size=3, context_shift=shift)
    with torch.inference_mode():
        got = [decoder.prefill(torch.tensor([prompt]))]
        got += [decoder.step(forced[:, i]) for i in range(forced.size(1))]
    assert decoder.refills >= 2
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("shift", [None, 5])
def test_generation_cached_equals_uncached(tok, pos_emb, shift):
    model = tiny(pos_emb, block_size=16)
    prompt = tok.encode("ROMEO: But")
    for cfg in (greedy(max_new_tokens=40, context_shift=shift),
                sampled(max_new_tokens=40, num_samples=3, context_shift=shift)):  # fmt: skip
        cached = generate(model, tok, prompt, cfg)
        assert cached == generate(model, tok, prompt, cfg, use_cache=False)
        assert all(len(ids) == 40 for ids in cached)


def test_rows_are_decoded_as_one_batch(tok):
    model = tiny()
    batch_sizes = []
    model.lm_head.register_forward_hook(lambda m, i, o: batch_sizes.append(o.size(0)))
    out = generate(model, tok, tok.encode("JULIET:"), sampled(max_new_tokens=10, num_samples=4))
    assert len(out) == 4 and len({tuple(r) for r in out}) > 1  # distinct samples
    # one prefill shared by all rows (batch 1), then 9 batched steps (the 10th token needs none)
    assert batch_sizes == [1] + [4] * 9


def test_training_mode_is_restored(tok):
    model = tiny().train()
    generate(model, tok, tok.encode("A"), greedy(max_new_tokens=3))
    assert model.training


# --- controls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "control", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999), dict(temperature=1e-4)]
)
def test_filters_that_leave_one_token_equal_greedy(tok, control):
    model = tiny()
    prompt = tok.encode("ROMEO:")
    expected = generate(model, tok, prompt, greedy(max_new_tokens=30))
    assert generate(model, tok, prompt, sampled(max_new_tokens=30, **control)) == expected
    # ...and without the control the same seed samples something else: the test can fail
    assert generate(model, tok, prompt, sampled(max_new_tokens=30)) != expected


def test_choose_next_respects_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, -1)
    gen = torch.Generator().manual_seed(0)
    draw = lambda **kw: set(choose_next(logits, sampled(**kw), gen).tolist())
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert draw(top_p=0.81) == {0, 1, 2}
    assert draw(min_p=0.2) == {0, 1, 2}  # 0.05 < 0.2 * 0.5
    assert draw(temperature=0.0) == {0}


def test_penalties_arithmetic():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0]])
    out = apply_penalties(logits, counts, GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    out = apply_penalties(logits, counts, GenerationConfig(frequency_penalty=0.5, presence_penalty=1.0))
    assert out.tolist() == [[0.0, -3.5, 1.0]]


@pytest.mark.parametrize("penalty", ["repetition_penalty", "frequency_penalty", "presence_penalty"])
def test_penalties_lower_the_repeat_rate(tok, penalty):
    model = tiny()
    prompt = []  # <|endoftext|> only: what is penalised is the model's own output

    def repeat_rate(ids):  # share of generated tokens already seen in prompt or output
        seen, repeats = set(prompt), 0
        for t in ids:
            repeats += t in seen
            seen.add(t)
        return repeats / len(ids)

    base = repeat_rate(generate(model, tok, prompt, greedy(max_new_tokens=40))[0])
    value = {"repetition_penalty": 3.0, "frequency_penalty": 2.0, "presence_penalty": 2.0}[penalty]
    penalised = repeat_rate(generate(model, tok, prompt, greedy(max_new_tokens=40, **{penalty: value}))[0])
    assert penalised < base / 2


def test_stop_strings_end_the_text_and_are_not_emitted(tok):
    model = tiny()
    prompt = tok.encode("JULIET:")
    full = generate_text(model, tok, prompt, greedy(max_new_tokens=40))[0]
    stop = full[12:15]  # three characters: three tokens
    first = full.find(stop)
    [done] = Generation(model, tok, prompt, greedy(max_new_tokens=40, stop=["zzz", stop])).run()
    assert done.text == full[:first] and done.finish_reason == "stop"
    assert tok.decode(done.ids) == done.text


def test_stop_token_ends_a_row(tok):
    model = tiny()
    prompt = tok.encode("JULIET:")
    full = generate(model, tok, prompt, greedy(max_new_tokens=30))[0]
    [done] = Generation(model, tok, prompt, greedy(max_new_tokens=30), stop_token_ids=[full[5]]).run()
    assert done.ids == full[: full.index(full[5])] and done.finish_reason == "stop"


def test_max_new_tokens_and_seed(tok):
    model = tiny()
    prompt = tok.encode("ROMEO:")
    a = generate_text(model, tok, prompt, sampled(max_new_tokens=25, seed=1, num_samples=2))
    assert a == generate_text(model, tok, prompt, sampled(max_new_tokens=25, seed=1, num_samples=2))
    assert a != generate_text(model, tok, prompt, sampled(max_new_tokens=25, seed=2, num_samples=2))
    assert all(len(ids) == 25 for ids in generate(model, tok, prompt, sampled(max_new_tokens=25)))


def test_padded_vocabulary_rows_are_never_sampled(tok):
    model = tiny(vocab_size=128)  # the tokenizer has far fewer tokens
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size :] += 5.0  # make the padding rows attractive
    ids = generate(model, tok, tok.encode("A"), sampled(max_new_tokens=50, num_samples=4, temperature=3.0))
    assert max(max(r) for r in ids) < tok.vocab_size


# --- beam search ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_beam_width_one_is_greedy(tok, pos_emb):
    model = tiny(pos_emb, block_size=16)
    prompt = tok.encode("ROMEO:")
    [best] = beam_search(model, tok, prompt, greedy(max_new_tokens=30))  # crosses the context limit
    assert best.ids == generate(model, tok, prompt, greedy(max_new_tokens=30))[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beams_are_at_least_as_likely_as_greedy(tok, seed):
    model = tiny(seed=seed, block_size=32)
    prompt = tok.encode("ROMEO: But")
    greedy_ids = generate(model, tok, prompt, greedy(max_new_tokens=12))[0]
    greedy_lp = total_logprob(model, prompt, greedy_ids, tok.vocab_size)
    for width in (2, 4):
        hyps = Generation(model, tok, prompt, greedy(max_new_tokens=12, num_beams=width, num_samples=2)).run()
        assert len(hyps) == 2 and hyps[0].logprob >= hyps[1].logprob
        assert hyps[0].logprob == pytest.approx(
            total_logprob(model, prompt, hyps[0].ids, tok.vocab_size), abs=1e-3
        )
        assert hyps[0].logprob >= greedy_lp - 1e-4


def test_beam_length_penalty_ranks_by_length(tok):
    model = tiny()
    prompt = tok.encode("ROMEO:")
    first = generate(model, tok, prompt, greedy(max_new_tokens=1))[0][0]  # ends a hypothesis at once

    def best(length_penalty):
        cfg = greedy(max_new_tokens=15, num_beams=3, length_penalty=length_penalty)
        return Generation(model, tok, prompt, cfg, stop_token_ids=[first]).run()[0]

    assert best(-10.0).ids == [] and best(-10.0).finish_reason == "stop"  # short ones favoured
    assert len(best(10.0).ids) == 15  # long ones favoured


# --- streaming and text ---------------------------------------------------------------------------


@pytest.mark.parametrize("beams", [1, 3])
def test_streamed_text_equals_final_text(tok, beams):
    model = tiny()
    prompt = tok.encode("JULIET:")
    full = generate_text(model, tok, prompt, sampled(max_new_tokens=30))[0]
    cfg = sampled(max_new_tokens=30, num_samples=3, stop=[full[10:12]], num_beams=beams)
    pieces = ["", "", ""]
    gen = Generation(model, tok, prompt, cfg)
    for row, piece in gen:
        pieces[row] += piece
    assert pieces == [c.text for c in gen.completions]
    assert pieces == generate_text(model, tok, prompt, cfg)


def test_text_stream_never_splits_a_character_and_holds_back_stop_prefixes():
    text = "héllo wörld 🎉 ok"
    ts = TextStream(ByteTokenizer())
    pieces = [ts.push(b) for b in text.encode("utf-8")] + [ts.end("length")]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the bytes of é, ö, 🎉 before their last one showed nothing

    ts = TextStream(ByteTokenizer(), stop=["ld 🎉"])
    pieces = [ts.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) == "héllo wör" == ts.text and ts.finish_reason == "stop"
    ts = TextStream(ByteTokenizer(), stop=["ab"])
    assert [ts.push(b) for b in b"xaac"] == ["x", "", "a", "ac"]


def test_streaming_bytes_from_a_model_matches_a_one_shot_decode():
    model = tiny(vocab_size=320)  # byte-level: random weights produce broken UTF-8 too
    tok = ByteTokenizer()
    cfg = sampled(max_new_tokens=60, temperature=2.0)
    gen = Generation(model, tok, tok.encode("é"), cfg)
    text = "".join(piece for _, piece in gen)
    ids = gen.completions[0].ids
    assert text == tok.decode_bytes(ids).decode("utf-8", errors="replace")


# --- bad input --------------------------------------------------------------------------------------


def test_empty_prompt_starts_from_end_of_text(tok):
    model = tiny()
    gen = Generation(model, tok, [], greedy(max_new_tokens=5))
    assert gen.prompt_ids == [tok.eot_id]
    assert gen.run()[0].ids == generate(model, tok, [tok.eot_id], greedy(max_new_tokens=5))[0]


def test_long_prompt_keeps_its_most_recent_part(tok):
    model = tiny(block_size=16)
    prompt = tok.encode(TEXT[:40])
    gen = Generation(model, tok, prompt, greedy(max_new_tokens=5))
    assert gen.dropped == 24 and gen.prompt_ids == prompt[-16:]
    assert gen.run()[0].ids == generate(model, tok, prompt[-16:], greedy(max_new_tokens=5))[0]


@pytest.mark.parametrize(
    "key, value",
    [("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("top_k", -1), ("min_p", 1.0),
     ("repetition_penalty", 0.0), ("num_samples", 0), ("max_new_tokens", 0), ("num_beams", 0),
     ("context_shift", 0), ("temperature", float("nan")), ("stop", [""])],
)  # fmt: skip
def test_out_of_range_settings_name_the_setting(key, value):
    with pytest.raises(ConfigError, match=key):
        GenerationConfig(**{key: value})


def test_more_samples_than_beams_is_rejected():
    with pytest.raises(ConfigError, match="num_samples"):
        GenerationConfig(num_beams=2, num_samples=3)


def test_a_sampled_batch_draws_each_prompts_rows_as_generation_does():
    """sample_batch (GRPO's rollouts): prompts of two lengths x 3 rows each, each prompt's rows sharing
    one seeded generator, give the samples that Generation draws for each prompt alone with
    num_samples=3 and that seed; a stop token ends a row early in both."""
    model = tiny("rope", block_size=32)
    tok = char_tokenizer(["abcdefghijklmnopqrstuvwxyz "])
    prompts = [tok.encode(p) for p in ("hello wor", "abc", "the cat s")]  # 9, 3, 9 tokens
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=0)
    stop = [tok.encode("e")[0]]
    want = []
    for i, p in enumerate(prompts):
        solo = Generation(model, tok, p, GenerationConfig(**{**cfg.__dict__, "num_samples": 3}),
                          stop_token_ids=stop, generator=torch.Generator().manual_seed(i))  # fmt: skip
        want += [(c.ids, c.finish_reason) for c in solo.run()]
    generators = [g for i in range(3) for g in [torch.Generator().manual_seed(i)] * 3]  # one per prompt
    rows = [p for p in prompts for _ in range(3)]
    got = [(c.ids, c.finish_reason) for c in sample_batch(model, tok, rows, cfg, generators, 9, stop)]
    assert got == want and {r for _, r in got} == {"stop", "length"}
