"""Speculative decoding (gpt.infer.speculative): greedy text identical to plain decoding for prompt
lookup and for a draft model, across the context boundary; the acceptance rule leaves the target's
distribution; sample.py and the chat REPL take ``draft=``; the combinations it cannot honour and a
draft with another tokenizer are refused in one line."""

import io

import pytest
import torch

from gpt.commands.cli import compose_config
from gpt.commands.sample import SAMPLE
from gpt.errors import ConfigError
from gpt.infer.chat_repl import ChatRepl
from gpt.infer.config import GenerationConfig
from gpt.infer.engine import Decoder
from gpt.infer.generate import generate
from gpt.infer.sample import sample
from gpt.infer.speculative import ModelDrafter, NgramDrafter, accept, drafter_from
from gpt.model import GPT, GPTConfig
from gpt.tokenizer import char_tokenizer

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"
PROMPTS = ["ROMEO: But", "J", TEXT[:15], "abab abab abab ab"]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int, pos_emb: str, n_embd: int = 32, block_size: int = 16) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=64,
                       pos_emb=pos_emb, bias=pos_emb == "learned")  # fmt: skip
    return GPT(config).eval()


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_text_is_plain_decodings_token_for_token(pos_emb, penalty):
    """40 tokens through a 16-token context (the window slides): ngram drafts, the target itself as a
    draft (everything kept), and a different, narrower draft model with a longer context."""
    tok = char_tokenizer([TEXT + "ab"])
    model = tiny(0, pos_emb)
    settings = GenerationConfig(max_new_tokens=40, temperature=0.0, repetition_penalty=penalty)
    drafters = [NgramDrafter(4, 3), NgramDrafter(1, 1), ModelDrafter(tiny(0, pos_emb), 4, tok.vocab_size),
                ModelDrafter(tiny(1, pos_emb, 16, 24), 3, tok.vocab_size)]  # fmt: skip
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        plain = generate(model, tok, ids, settings)
        for drafter in drafters:
            assert generate(model, tok, ids, settings, drafter=drafter) == plain, (prompt, drafter)


@pytest.mark.parametrize("point_mass", [False, True])
def test_the_acceptance_rule_gives_the_targets_distribution(point_mass):
    """One drafted token x ~ q over a 4-token vocabulary, 20000 times with a fixed seed: the token
    that comes out (x kept, or the residual's) is distributed as p; also for point-mass (ngram) q."""
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    trials = 20000
    drafts = torch.multinomial(q[0], trials, replacement=True, generator=g).tolist()
    for x in drafts:
        x = 2 if point_mass else x  # an ngram's draft is always the same token
        n, nxt = accept(p, None if point_mass else q, [x], g)
        counts[x if n == 1 else nxt] += 1
    freq = counts / trials
    # over 4 standard deviations of a frequency near 0.5 over 20000 trials (0.0035)
    assert torch.allclose(freq, p[0].float(), atol=0.015), freq


def test_acceptance_counts_and_residual_exactly():
    """p == q keeps every draft; a draft p gives no mass is always replaced from the residual."""
    p = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    assert accept(p, p[:1].clone(), [1], g)[0] == 1
    for _ in range(20):
        assert accept(p, torch.tensor([[0.5, 0.0, 0.5]], dtype=torch.float64), [2], g) == (0, 1)


def test_seeded_sampling_reproduces_and_runs_through_every_setting():
    tok = char_tokenizer([TEXT])
    model = tiny(0, "rope")
    settings = GenerationConfig(max_new_tokens=30, temperature=0.9, top_k=10, top_p=0.9, min_p=0.01,
                                frequency_penalty=0.2, seed=4)  # fmt: skip
    for drafter in (NgramDrafter(3, 2), ModelDrafter(tiny(1, "rope", 16), 3, tok.vocab_size)):
        first = generate(model, tok, tok.encode("ROMEO"), settings, drafter=drafter)
        assert first == generate(model, tok, tok.encode("ROMEO"), settings, drafter=drafter)
        assert len(first[0]) == 30


def test_what_cannot_be_honoured_is_refused_in_one_line(tmp_path):
    tok = char_tokenizer([TEXT])
    model = tiny(0, "rope")
    with pytest.raises(ConfigError, match="num_samples=1"):
        generate(model, tok, [1], GenerationConfig(num_samples=2), drafter=NgramDrafter(4, 3))
    from gpt.checkpoint import save_checkpoint

    other = char_tokenizer(["xyz"])
    state = {"model": model.state_dict(), "model_config": model.config.to_dict(),
             "tokenizer": other.to_state()}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    with pytest.raises(ConfigError, match="different tokenizer"):
        drafter_from(str(tmp_path), 4, 3, model, tok)


def typed(lines: list[str]):
    """An input function that types ``lines``, then Ctrl-D."""
    pending = iter(lines)

    def read(_prompt: str) -> str:
        line = next(pending, None)
        if line is None:
            raise EOFError
        return line

    return read


def test_sample_py_and_the_chat_repl_take_draft(tmp_path):
    """sample.py with draft=ngram and draft=RUN prints plain decoding's greedy text; the chat REPL,
    whose cache is kept across turns, gives the same replies with and without a draft model."""
    from helpers_serve import tiny_run

    run = str(tiny_run(tmp_path / "run"))
    base = {**compose_config(SAMPLE, [])[0], "ckpt": run, "prompt": "ROMEO: ROMEO:", "temperature": 0.0,
            "max_new_tokens": 60, "device": "cpu", "dtype": "fp32"}  # fmt: skip
    texts = []
    for draft in (None, "ngram", run):
        out = io.StringIO()
        sample({**base, "draft": draft}, out=out, err=io.StringIO())
        texts.append(out.getvalue())
    assert texts[0] == texts[1] == texts[2]

    from gpt.runs.load import load

    loaded = load(run)
    model, tok = loaded.build().eval(), loaded.tokenizer
    replies = []
    for drafter in (None, drafter_from(run, 4, 3, model, tok)):
        out = io.StringIO()
        settings = GenerationConfig(max_new_tokens=30, temperature=0.0)
        ChatRepl(model, tok, settings, input_fn=typed(["Hello", "Again"]), out=out, err=io.StringIO(),
                 history_file=None, drafter=drafter).run()  # fmt: skip
        replies.append(out.getvalue())
    assert replies[0] == replies[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_checking_drafts_gives_the_logits_of_one_token_steps_bit_for_bit(dtype):
    """The target's forward over k drafted tokens (``Decoder.extend``) equals k one-token steps to the
    bit in bf16 (the CPU's default), below and above the cache length where the one-token attention
    leaves SDPA: greedy text cannot depend on near-ties rounding another way (SDPA over the k queries
    flipped them). fp32's GEMM of k rows rounds its last bit differently from one row's (~1e-7)."""
    model = tiny(3, "rope", n_embd=64, block_size=128).to(dtype)
    torch.manual_seed(0)
    with torch.inference_mode():
        for prompt in (8, 90):  # cached keys below and above ONE_TOKEN_MIN_KEYS (64)
            ids = torch.randint(0, 64, (1, prompt + 6))
            steps, fed = Decoder(model, 1), Decoder(model, 1)
            steps.prefill(ids[:, :prompt])
            want = torch.stack([steps.step(ids[0, i : i + 1])[0] for i in range(prompt, prompt + 6)])
            fed.prefill(ids[:, :prompt])
            got = fed.extend(ids[:, prompt:])[0]
            exact = dtype == torch.bfloat16
            assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=0, atol=1e-6)
