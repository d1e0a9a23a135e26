"""The one decoding engine, measured: seeded sampling, beam search and the server's continuous
batching reproduce the text of the code before the engine was unified (goldens computed with it);
``sample.py`` at temperature 0, the server at temperature 0 and a generative eval task give the same
text; and gpt/ holds exactly one KV-cache class."""

import ast
import io
import json
import time

import pytest
import torch

from gpt.commands.cli import compose_config
from gpt.commands.sample import SAMPLE
from gpt.eval.tasks import TasksConfig, TaskSuite
from gpt.infer.config import GenerationConfig, ServeConfig
from gpt.infer.engine import Decoder
from gpt.infer.generate import generate_text
from gpt.infer.sample import sample
from gpt.model import GPT, GPTConfig
from gpt.runs.load import load
from gpt.serve.batcher import Batcher, Done, Piece, Request
from gpt.tokenizer import EOT, EOT_TURN, CharTokenizer, char_tokenizer
from gpt.typed_config import REPO_ROOT

TEXT = "ROMEO: But soft, what light through yonder window breaks?\nJULIET: Ay me!\n"
CASES = {
    "plain": dict(temperature=1.0, top_k=0, seed=5),
    "top_k_top_p": dict(temperature=0.9, top_k=10, top_p=0.8, seed=3, num_samples=3),
    "min_p_penalties": dict(temperature=1.2, top_k=0, min_p=0.05, repetition_penalty=1.5,
                            frequency_penalty=0.3, presence_penalty=0.2, seed=7, num_samples=2),
    "context_shift": dict(temperature=1.0, top_k=0, seed=9, num_samples=2, context_shift=5),
    "beam": dict(temperature=0.0, num_beams=3, num_samples=2),
    "beam_penalty": dict(temperature=0.0, num_beams=3, num_samples=2, repetition_penalty=2.0,
                         length_penalty=0.5),
}  # fmt: skip
# 24 new tokens after "ROMEO: But" (the server: 12, two seeded choices) from the code before the
# engine was unified; ~ stands for <|end_of_turn|>, $ for <|endoftext|>
GOLDEN = {
    "learned/plain": ["iIOLJtgmtURMrE:LOOndkT M"],
    "learned/top_k_top_p": [
        "AUEtU:~nehh\n!wmeaEEEE,,:",
        "EwR!J:,,,d,,LLRr!fiiea~E",
        "ttORydeUdw!rLJBdffbeEwwE",
    ],
    "learned/min_p_penalties": ["LtyLn!A?\n:ykw$AeiTEnaTIr", "Jksfo! t$~uLmsy,l!!RwbAR"],
    "learned/context_shift": ["IM ,?ego:~dMByBIJu!aRwgO", "t,g:gJM\nrfEl!TU~~n$MR\nls"],
    "learned/beam": ["t~~~~~~~~~~~~~~~~~~~~~~~", "t~~~~~~~~~~~~~~~~~~~~~~t"],
    "learned/beam_penalty": ["yyddd~~~~~~~~~~~~~~~~~~~", "yyddd~~~~~~~~~~~~~~~~~~o"],
    "learned/server": [" Er,raE", "Uo?$~hb"],
    "rope/plain": ["iJOLJtgmtaRMrE:LOOndiT M"],
    "rope/top_k_top_p": ["!!,uM!tdeJy!,yaTTaTTAAAO", "LsOE?::::f?:fTah RuMMM~M", "ttdkydraTk eRRRrngEE\nem,"],
    "rope/min_p_penalties": ["JuyLo!A:\n:wku$?fiTEmbTIr", "Jksfn! t$~tLmr$,l!!RwbAR"],
    "rope/context_shift": ["IM ,?ffn:$dOBwAEJw!UOugO", "t,h:fJO\nrfBk TT~~m$MR\nls"],
    "rope/beam": ["dddddddddddddddddddddddd", "dddddddddddddddddddddddy"],
    "rope/beam_penalty": ["dddddddddddddddddddddddd", "dddddddddddddddddddddddy"],
    "rope/server": ["\nRs:ofA", "Tm,yyia"],
}

pytestmark = pytest.mark.usefixtures("one_thread")


def short(text: str) -> str:
    return text.replace("<|end_of_turn|>", "~").replace("<|endoftext|>", "$")


def tiny(pos_emb: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, pos_emb=pos_emb,
                       bias=pos_emb == "learned")  # fmt: skip
    return GPT(config).eval()


def serve_texts(model: GPT, tok, prompt: list[int], settings: GenerationConfig, n: int) -> list[str]:
    """The choices' text of one request through the batcher (no HTTP)."""
    events: list = []
    batcher = Batcher(model, tok, max_batch=4)
    batcher.start()
    try:
        batcher.submit(Request(prompt, settings, n=n, emit=events.append))
        deadline = time.monotonic() + 30
        while not any(isinstance(e, Done) for e in events) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.stop()
    texts = [""] * n
    for e in events:
        if isinstance(e, Piece):
            texts[e.choice] += e.text
    return texts


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_seeded_sampling_and_beams_reproduce_the_code_before_the_engine(pos_emb):
    # the vocabulary of the golden run: the characters, then only the two special tokens of that time
    chars = sorted(set(TEXT))
    model, tok = tiny(pos_emb), CharTokenizer(chars, {EOT: len(chars), EOT_TURN: len(chars) + 1})
    prompt = tok.encode("ROMEO: But")
    for name, kw in CASES.items():
        texts = generate_text(model, tok, prompt, GenerationConfig(max_new_tokens=24, **kw))
        assert [short(t) for t in texts] == GOLDEN[f"{pos_emb}/{name}"], name
    settings = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=20, seed=3, repetition_penalty=1.3)
    assert [short(t) for t in serve_texts(model, tok, prompt, settings, 2)] == GOLDEN[f"{pos_emb}/server"]


def test_sample_py_the_server_and_an_eval_task_give_the_same_greedy_text(tmp_path):
    """One model (a tiny trained run), one prompt, temperature 0: the same text three ways."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from helpers_serve import live_server, tiny_run

    run_dir = tiny_run(tmp_path / "run")
    prompt, n = "ROMEO:", 20
    out = io.StringIO()
    cfg = {**compose_config(SAMPLE, [])[0], "ckpt": str(run_dir), "prompt": prompt, "temperature": 0.0,
           "max_new_tokens": n, "echo_prompt": False, "device": "cpu", "dtype": "fp32"}  # fmt: skip
    sample(cfg, out=out, err=io.StringIO())
    text = out.getvalue().removesuffix("\n")
    assert len(text) == n and "<|" not in text  # a continuation of n plain characters

    loaded = load(str(run_dir))
    model = loaded.build().eval()
    with live_server(model, loaded.tokenizer, ServeConfig(max_batch=4)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
    assert reply.choices[0].text == text

    task = tmp_path / "same.jsonl"
    task.write_text(json.dumps({"prompt": prompt, "answer": text}) + "\n")
    tasks = TasksConfig(tasks=[str(task)], match="exact", max_new_tokens=n, stop=[], chat=False)
    result = TaskSuite(tasks.tasks, tasks).score(model, loaded.tokenizer)
    assert result["same"]["metrics"] == {"exact_match": 1.0}


def kv_cache_classes(tree: ast.Module) -> list[str]:
    """Classes named like a cache or storing keys and values (an ``update(layer, k, v)`` method),
    typing Protocols (interfaces, no storage) aside."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        if any(isinstance(b, ast.Name) and b.id == "Protocol" for b in node.bases):
            continue
        updates = [f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "update"
                   and [a.arg for a in f.args.args] == ["self", "layer", "k", "v"]]  # fmt: skip
        if "cache" in node.name.lower() or updates:
            found.append(node.name)
    return found


def test_exactly_one_kv_cache_class():
    found = {
        f"{path.relative_to(REPO_ROOT)}:{name}"
        for path in (REPO_ROOT / "gpt").rglob("*.py")
        for name in kv_cache_classes(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert found == {"gpt/infer/engine.py:KVCache"}


def test_equal_rows_keep_the_fast_paths():
    """An empty cache's prefill and a decode step of equally long rows get no mask (plain causal
    SDPA, and every cached key); a prefill after cached tokens gets one."""
    model, tok = tiny("rope"), char_tokenizer([TEXT])
    decoder = Decoder(model, 3)
    with torch.inference_mode():
        decoder.prefill(torch.tensor([tok.encode("ROMEO:")]))
        assert decoder.cache.attn_mask is None
        decoder.step(torch.tensor([1, 2, 3]))
        assert decoder.cache.attn_mask is None and decoder.cache.positions.tolist() == [[6]] * 3
        chat = Decoder(model, 1)
        chat.prefill(torch.tensor([tok.encode("ROMEO:")]))
        chat.prefill(torch.tensor([tok.encode("ROMEO: But")]), reuse=True)
        assert chat.reused == 6 and chat.cache.attn_mask is not None
