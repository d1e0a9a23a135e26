"""``compile=true`` (gpt.infer.engine.compile_decode): the compiled one-token decode step gives the
eager step's greedy tokens, token for token, at batch 1 and 3, across the 64-key switch of
``one_token_attention`` and the sliding window's re-fill, without a recompile per token; sample.py
and the server take the key."""

import copy
import io

import pytest
import torch
from helpers_serve import tiny_run

from gpt.commands.cli import compose_config
from gpt.commands.sample import SAMPLE
from gpt.infer.config import ServeConfig
from gpt.infer.engine import compile_decode
from gpt.infer.generate import greedy_batch
from gpt.infer.sample import sample
from gpt.model import GPT, GPTConfig
from gpt.serve.app import create_app
from gpt.serve.server import load_for_serving
from gpt.tokenizer import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow  # four compiles of a tiny model: ~50 s on 2 shared cores
def test_compiled_greedy_equals_eager_token_for_token():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=96, vocab_size=128, pos_emb="rope")
    model = GPT(config).eval()  # fp32: equal greedy tokens need no bf16 rounding ties
    tok = char_tokenizer("abcdefghijklmnopqrstuvwxyz .,\n")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8]], [[1, 2, 3, 4, 5, 6, 7, 8], [9, 8, 7, 6, 5, 4, 3, 2], [3] * 8]
    # 8 + 120 tokens: past 64 cached keys, and past block_size (a re-fill, which runs eagerly)
    eager = [[c.ids for c in greedy_batch(model, tok, p, 120)] for p in prompts]
    compile_decode(model)
    torch._dynamo.utils.counters.clear()
    compiled = [[c.ids for c in greedy_batch(model, tok, p, 120)] for p in prompts]
    assert compiled == eager and len(eager[1][2]) == 120
    # one graph for 1 row, one for several, each once more when the cache is full (the slice [:end]
    # is then the whole cache: a guard): none per token
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
    assert copy.deepcopy(model).__dict__.get("_compiled_step") is None  # a copy compiles only if asked
    torch._dynamo.reset()


def test_sample_py_and_the_server_take_compile(tmp_path):
    """The key reaches the model (compiling waits for the first step: nothing is compiled here)."""
    run = tiny_run(tmp_path / "run")
    served = load_for_serving(ServeConfig(ckpt=str(run), device="cpu", dtype="fp32", compile=True))
    assert served.model.__dict__.get("_compiled_step") is not None
    plain = load_for_serving(ServeConfig(ckpt=str(run), device="cpu", dtype="fp32"))
    assert plain.model.__dict__.get("_compiled_step") is None
    # with a draft model its steps are compiled; the model checks the drafts eagerly (exact text)
    both = ServeConfig(ckpt=str(run), device="cpu", dtype="fp32", compile=True, draft=str(run))
    spec = load_for_serving(both)
    assert spec.model.__dict__.get("_compiled_step") is None
    drafter = create_app(spec.model, spec.tokenizer, both, "tiny", True).state.service.batcher.drafter
    assert drafter.model.__dict__.get("_compiled_step") is not None
    cfg = {**compose_config(SAMPLE, ["compile=true"])[0], "ckpt": str(run), "device": "cpu"}
    assert cfg["compile"] is True
    with pytest.raises(Exception, match="compile"):  # a bad value names the key
        sample({**cfg, "compile": "maybe"}, out=io.StringIO(), err=io.StringIO())


@pytest.mark.slow  # one compile of a tiny model: ~20 s
def test_gpt_eval_dialogs_takes_compile(tmp_path):
    """The same replies and scores compiled as eager (fp32), on the tiny chat run's dialogs."""
    import json

    from helpers_serve import DIALOGS

    from gpt.eval.dialogs import EvalConfig, evaluate

    run, data = tiny_run(tmp_path / "run"), tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": d}) + "\n" for d in DIALOGS))
    eager, compiled = (evaluate(EvalConfig(ckpt=str(run), data=str(data), device="cpu", compile=c))
                       for c in (False, True))  # fmt: skip
    assert compiled["all"] == eager["all"] and compiled["tasks"] == eager["tasks"]
    torch._dynamo.reset()
