"""The lm-evaluation-harness adapter: its loglikelihood equals our task runner's scorer, its rolling
loglikelihood our bits per byte, its generate_until our greedy decoding, and an lm_eval run over a
local JSONL task (offline) completes and writes its results."""

import json
import math
import os
import re

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never the Hub
lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'gpt[eval]'")

from helpers_eval import save_run, tiny_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from gpt.errors import UserError  # noqa: E402
from gpt.eval.bpb import bits_per_byte  # noqa: E402
from gpt.eval.lm_eval import GPTLM, cli  # noqa: E402
from gpt.eval.scoring import choice_logprobs  # noqa: E402
from gpt.eval.tasks import TasksConfig, TaskSuite  # noqa: E402
from gpt.infer.generate import greedy_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS = [
    {"context": "Question: the sky is", "choices": ["blue", "green", "made of cheese"], "answer": 0},
    {"context": "Question: two and two make", "choices": ["four", "five"], "answer": 0},
    {"context": "ROMEO:", "choices": ["O", "Juliet, my love", "what light"], "answer": 2},
]


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    model, tok = tiny_model(block_size=32)
    return save_run(tmp_path_factory.mktemp("lm_eval") / "run", model, tok), model, tok


def test_adapter_scores_equal_our_own(run_dir, tmp_path):
    path, model, tok = run_dir
    lm = GPTLM(ckpt=str(path), device="cpu", batch_size=4, dtype="fp32")  # our scorer below runs in fp32
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    ours = TaskSuite([str(task)], TasksConfig()).score(model, tok)["mc"]["metrics"]["acc"]
    reqs = [request("loglikelihood", it["context"], " " + c) for it in ITEMS for c in it["choices"]]
    scores = [lp for lp, _ in lm.loglikelihood(reqs)]
    ours_scores = choice_logprobs(
        model, tok, [(it["context"], [" " + c for c in it["choices"]]) for it in ITEMS]
    )
    assert scores == pytest.approx([v for row in ours_scores for v in row], abs=1e-5)
    k, right = 0, 0
    for it in ITEMS:
        s = scores[k : k + len(it["choices"])]
        right += max(range(len(s)), key=s.__getitem__) == it["answer"]
        k += len(it["choices"])
    assert right / len(ITEMS) == ours
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind\n"
    [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    bpb = bits_per_byte(model, tok, [text])["bpb"]
    assert -rolling / math.log(2) / len(text.encode()) == pytest.approx(bpb, rel=1e-5)
    [generated] = lm.generate_until(
        [request("generate_until", "ROMEO:", {"until": ["\n"], "max_gen_toks": 10})]
    )
    assert generated == greedy_batch(model, tok, [tok.encode("ROMEO:")], 10, stop=["\n"])[0].text


@pytest.mark.slow  # imports the harness, datasets and pandas: about 10 s of CPU
def test_an_lm_eval_run_over_a_local_task_file_writes_its_results(run_dir, tmp_path, monkeypatch):
    path, model, tok = run_dir
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    out = tmp_path / "results"
    # no --device: lm-eval's default (cuda:0) would fail on a CPU machine; ours is auto
    cli(["run", "--model", "gpt", "--model_args", f"ckpt={path},dtype=fp32",
         "--tasks", "tiny_mc", "--include_path", str(tasks), "--output_path", str(out),
         "--batch_size", "4"])  # fmt: skip
    files = list(out.rglob("results*.json"))
    assert files, f"no results file under {out}"
    results = json.loads(files[0].read_text())["results"]["tiny_mc"]
    [ours] = TaskSuite([str(data)], TasksConfig()).score(model, tok).values()
    assert results["acc,none"] == pytest.approx(ours["metrics"]["acc"])


def make_gpt(model_args: str, device: str | None):
    """Our model as lm-eval makes it: from the --model_args string, with its own flags beside."""
    return lm_eval.api.registry.get_model("gpt").create_from_arg_string(
        model_args, {"batch_size": None, "max_batch_size": None, "device": device}
    )


@pytest.mark.parametrize("model_args, message", [
    ("ckpt={missing}", "no checkpoint at"),
    ("ckpt=", "--model_args needs ckpt="),
    ("dtype=fp32", "--model_args needs ckpt="),
    ("ckpt={run},bogus=1", "unknown config key 'model_args.bogus'"),
    ("ckpt={run},stride=abc", "model_args.stride='abc' must be an integer"),
    ("ckpt={run},dtype=fp8", "model_args.dtype='fp8' must be one of"),
    ("ckpt={run},max_gen_toks=0", "model_args.max_gen_toks=0 is out of range"),
])  # fmt: skip
def test_a_bad_ckpt_or_model_args_is_a_user_error(run_dir, tmp_path, model_args, message):
    """Each is a UserError (the command prints it as one line: the slow test below runs one)."""
    path, _, _ = run_dir
    with pytest.raises(UserError, match=re.escape(message)):
        make_gpt(model_args.format(missing=tmp_path / "nope", run=path), "cpu")


def test_lm_evals_own_flags_in_model_args_are_one_line(run_dir, capsys):
    """batch_size in --model_args too was a TypeError ("multiple values") deep inside lm-eval."""
    path, _, _ = run_dir
    with pytest.raises(SystemExit) as exit_:
        cli(["--model", "gpt", "--model_args", f"ckpt={path},batch_size=4", "--tasks", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "error: --model_args batch_size=... is lm-eval's own flag" in err


def test_no_device_means_auto_not_lm_evals_cuda(run_dir):
    """lm-eval's default device is cuda:0: without --device the command asks for ``auto``; an
    explicit device this machine lacks is a UserError (one line)."""
    path, _, _ = run_dir
    assert make_gpt(f"ckpt={path}", "auto").device.type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="device=cuda but no CUDA GPU is available"):
            make_gpt(f"ckpt={path}", "cuda:0")


@pytest.mark.slow  # the harness indexes its task list first: about 15 s of CPU
def test_the_command_prints_a_wrong_ckpt_as_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # no --device: lm-eval's cuda:0 would be refused first
        cli(["run", "--model", "gpt", "--model_args", f"ckpt={tmp_path / 'nope'}", "--tasks", "arc_easy"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: no checkpoint at {tmp_path / 'nope'}")
