"""The task runner: multiple choice by summed and length-normalised log-probability, generative
tasks on the engine's greedy decoding, seeded few-shot prompts, the cloze task, the result file,
and one clear message for a malformed task file."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from helpers_eval import save_run, tiny_model

from gpt.chat_template import render_prompt
from gpt.commands.eval import run as eval_main
from gpt.errors import DataError
from gpt.eval.cloze import cloze_items
from gpt.eval.scoring import choice_logprobs, encode_pair
from gpt.eval.tasks import (
    TasksConfig,
    TaskSuite,
    generative_prompt,
    load_task,
    mc_context,
)
from gpt.infer.config import GenerationConfig
from gpt.infer.generate import generate_text, greedy_batch
from gpt.typed_config import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["a", "be", "cat", "dog", "eel", "fine", "gone", "house", "island", "jumping", "kingdoms", "lantern"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def hand_logprob(model, tok, context: str, choice: str) -> float:
    ctx, cont = encode_pair(tok, context, choice)
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(ids[:, :-1])[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def test_multiple_choice_sums_log_probs_and_length_normalisation_can_change_the_answer(tmp_path):
    model, tok = tiny_model(block_size=64)
    context = "Question: which word? Answer:"
    scores = {w: hand_logprob(model, tok, context, " " + w) for w in WORDS}
    assert choice_logprobs(model, tok, [(context, [" " + w for w in WORDS])])[0] == pytest.approx(
        [scores[w] for w in WORDS], abs=1e-4
    )
    per_byte = {w: scores[w] / len(" " + w) for w in WORDS}
    # a short choice that wins on the sum, a long one that wins per byte
    pair = next((s, lg) for s in WORDS for lg in WORDS
                if scores[s] > scores[lg] and per_byte[lg] > per_byte[s])  # fmt: skip
    short, long = pair
    rows = [{"context": context, "choices": [short, long], "answer": a} for a in (0, 1)]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    result = TaskSuite([str(path)], TasksConfig(tasks=[str(path)])).score(model, tok)["mc"]
    # item 0 (answer: the short one) is right by the sum, item 1 (the long one) by the normalised score
    assert result["metrics"] == {"acc": 0.5, "acc_norm": 0.5} and result["n"] == 2
    one = write_jsonl(tmp_path / "one.jsonl", [{"context": context, "choices": [short, long], "answer": 0}])
    assert TaskSuite([str(one)], TasksConfig()).score(model, tok)["one"]["metrics"] == {
        "acc": 1.0,
        "acc_norm": 0.0,
    }


def test_fewshot_prompts_are_deterministic_for_a_seed_and_come_from_the_train_file(tmp_path):
    task_dir = tmp_path / "capitals"
    task_dir.mkdir()
    write_jsonl(
        task_dir / "test.jsonl", [{"context": f"Q{i}:", "choices": ["x", "y"], "answer": 0} for i in range(5)]
    )
    write_jsonl(task_dir / "train.jsonl", [{"context": f"T{i}:", "choices": ["p", "q"], "answer": i % 2}
                                           for i in range(20)])  # fmt: skip
    task = load_task(str(task_dir))
    assert task.name == "capitals" and len(task.train) == 20
    prompts = lambda seed: [mc_context(task, i, TasksConfig(num_fewshot=3, seed=seed)) for i in range(5)]
    assert prompts(1) == prompts(1)
    assert prompts(1) != prompts(2)
    first = prompts(1)[0].split("\n\n")
    assert len(first) == 4 and first[-1] == "Q0:" and all(p.startswith("T") for p in first[:3])
    assert all(p.endswith(" p") or p.endswith(" q") for p in first[:3])


def test_greedy_batch_equals_the_engine_one_prompt_at_a_time():
    model, tok = tiny_model(block_size=32)
    prompts = [tok.encode(t) for t in ["abc", "xyz", "hello", "world", "to be or"]]  # two share a length
    got = [c.text for c in greedy_batch(model, tok, prompts, max_new_tokens=12, batch_size=4)]
    settings = GenerationConfig(max_new_tokens=12, temperature=0.0)
    assert got == [generate_text(model, tok, p, settings)[0] for p in prompts]
    stopped = [c.text for c in greedy_batch(model, tok, prompts, max_new_tokens=12, stop=[got[0][3]])]
    assert stopped[0] == got[0][: got[0].index(got[0][3])]


def test_generative_task_matches_exact_normalized_and_regex(tmp_path):
    model, tok = tiny_model(block_size=48)
    prompts = ["Capital of France:", "Two plus two:", "Colour of the sky:"]
    said = [c.text for c in greedy_batch(model, tok, [tok.encode(p) for p in prompts], 8, stop=["\n"])]
    rows = [{"prompt": prompts[0], "answer": said[0]},  # right, exactly
            {"prompt": prompts[1], "answer": "The " + said[1].upper() + "!"},  # right once normalized
            {"prompt": prompts[2], "answer": said[2] + "zzz"}]  # wrong  # fmt: skip
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    score = lambda **kw: TaskSuite([str(path)], TasksConfig(max_new_tokens=8, **kw)).score(model, tok)["gen"]
    exact = score(match="exact")["metrics"]["exact_match"]
    normalized = score(match="normalized")["metrics"]["match"]
    assert said[1].strip(), "the random model says something to the second prompt"
    assert exact == pytest.approx(1 / 3) and normalized == pytest.approx(2 / 3)
    regex = write_jsonl(tmp_path / "re.jsonl", [{"prompt": prompts[0], "answer": "^" + re.escape(said[0])},
                                                {"prompt": prompts[1], "answer": "^zzz"}])  # fmt: skip
    assert TaskSuite([str(regex)], TasksConfig(match="regex", max_new_tokens=8)).score(model, tok)["re"][
        "metrics"
    ] == {"regex_match": 0.5}


def test_chat_models_get_the_prompt_through_the_chat_template(tmp_path):
    _, tok = tiny_model()
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "hi there", "answer": "hello"},
                                                 {"prompt": "bye", "answer": "ciao"}])  # fmt: skip
    task = load_task(str(path))
    ids = generative_prompt(task, 0, TasksConfig(num_fewshot=1), tok, chat=True)
    expected = [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"},
                {"role": "user", "content": "hi there"}]  # fmt: skip
    assert ids == render_prompt(tok, expected)


def test_cloze_items_are_four_same_length_continuations_at_word_starts():
    text = (REPO_ROOT / "data" / "tinyshakespeare" / "input.txt").read_text()[-20_000:]
    items = cloze_items(text, n=50, context_bytes=64, continuation_bytes=24, seed=3)
    assert len(items) == 50 and items == cloze_items(
        text, n=50, context_bytes=64, continuation_bytes=24, seed=3
    )
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert {len(c.encode()) for c in it["choices"]} == {24}
        assert it["context"] + it["choices"][it["answer"]] in text
        assert it["context"][-1].isspace() and all(not c[0].isspace() for c in it["choices"])
    assert len({it["answer"] for it in items}) == 4  # the right answer is not always in one place


def test_tasks_command_writes_one_result_file_and_prints_a_table(tmp_path, capsys):
    model, tok = tiny_model(block_size=32)
    run = save_run(tmp_path / "run", model, tok)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"context": "a b", "choices": [" c", " d"], "answer": 1}] * 3)
    out = tmp_path / "results.json"
    eval_main(["tasks", f"ckpt={run}", f"tasks=[{mc}]", "device=cpu", f"out={out}", "num_fewshot=1"])
    result = json.loads(out.read_text())["tasks"]["mc"]
    assert result["n"] == 3 and set(result["metrics"]) == {"acc", "acc_norm"} and "acc" in result["stderr"]
    assert "mc" in capsys.readouterr().out


@pytest.mark.parametrize(
    "line, message",
    [
        ({"choices": ["a", "b"], "answer": 0}, "missing field 'context'"),
        ({"context": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is out of range for 2 choices"),
        ({"context": "q", "choices": [], "answer": 0}, "'choices' is an empty list"),
        ({"prompt": "q"}, "missing field 'answer'"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_bad_task_file_is_one_message_with_file_and_line(tmp_path, line, message):
    good = {"context": "q", "choices": ["a", "b"], "answer": 1}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    with pytest.raises(DataError, match=message) as e:
        load_task(str(path))
    assert str(e.value).startswith(f"{path}:2: ")


def test_the_command_reports_a_bad_task_file_in_one_line(tmp_path, capsys):
    model, tok = tiny_model()
    run = save_run(tmp_path / "run", model, tok)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"context": "q", "choices": ["a"], "answer": 3}])
    with pytest.raises(SystemExit) as e:
        eval_main(["tasks", f"ckpt={run}", f"tasks=[{path}]", "device=cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {path}:1: answer 3 is out of range for 1 choices (an index 0..0)"
