"""A task runner for local task files (JSONL): multiple choice and generative, few-shot, one JSON
result per run and a printed table. No network: users evaluate on their own data.

    gpt eval tasks ckpt=out/run tasks=[my_tasks/capitals,my_tasks/arith.jsonl] num_fewshot=3
    gpt eval tasks ckpt=out/shakespeare_char tasks=[cloze] out=results.json

A task is a directory holding ``test.jsonl`` (and optionally ``train.jsonl``), or a file ``NAME.jsonl``
(few-shot examples then come from ``NAME_train.jsonl`` beside it, or ``train.jsonl`` beside
``test.jsonl``), or ``cloze`` (``gpt.eval.cloze`` on the run's own held-out text). One item a line:

- multiple choice ``{"context": str, "choices": [str, ...], "answer": index}``: each choice is scored
  by its summed log-probability after the context (``acc``), and by that per UTF-8 byte of the
  delimiter and choice (``acc_norm``, which does not favour short choices);
- generative ``{"prompt": str, "answer": str}`` or ``{"messages": [...], "answer": str}``: a greedy
  completion (``gpt.infer.generate.greedy_batch``) compared by ``match``: exact, normalized
  (case, punctuation, articles and spacing ignored) or regex (``answer`` is a pattern searched in the
  completion). A chat model (tuned on dialogs) gets the prompt as a user turn through the chat template.

Few-shot: ``num_fewshot`` examples drawn from the train file (else from the other test items) with
a generator seeded by (seed, task, item), so a prompt is the same on every run of a seed.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gpt.chat_template import check_messages, render_prompt
from gpt.device import autocast_for, pick_device, resolve_dtype
from gpt.errors import ConfigError, DataError
from gpt.eval.bpb import TextConfig, read_texts
from gpt.eval.cloze import cloze_items
from gpt.eval.scoring import choice_logprobs
from gpt.infer.generate import greedy_batch
from gpt.model import GPT
from gpt.quant import Quantize
from gpt.runs.load import load
from gpt.tokenizer import EOT_TURN
from gpt.typed_config import Dtype, resolve_path


@dataclass
class TasksConfig:
    """``gpt eval tasks``: task files (JSONL) or the built-in cloze task (``--help`` lists every key)."""

    ckpt: str = "out/shakespeare_char"
    """The model: a run directory, a checkpoint file, a LoRA run or hf:DIR."""
    tasks: list[str] = field(default_factory=lambda: ["cloze"])
    """Task directories (test.jsonl [+ train.jsonl]) or files (NAME.jsonl [+ NAME_train.jsonl]), or
    'cloze'."""
    num_fewshot: int = 0
    """Examples before each item, from the train file (else the other test items)."""
    seed: int = 1234
    """Few-shot draws (the same prompts for the same seed) and cloze items."""
    limit: int = 0
    """Score only the first this many items of each task; 0 = all."""
    match: Literal["exact", "normalized", "regex"] = "normalized"
    """Generative: exact | normalized (case, punctuation, articles ignored) | regex (the answer is a
    pattern)."""
    max_new_tokens: int = 32
    """Generative: the longest completion."""
    stop: list[str] = field(default_factory=lambda: ["\n"])
    """Generative tasks, base models: stop strings (a chat model stops at end-of-turn)."""
    chat: bool | None = None
    """Render prompts with the chat template; None = when the model was tuned on dialogs."""
    delimiter: str = " "
    """Between a context and its choice, and a prompt and its answer in few-shot examples."""
    fewshot_separator: str = "\n\n"
    """Between few-shot examples."""
    cloze_n: int = 200
    """Items of the cloze task (from the run's held-out text)."""
    batch_size: int = 16
    """Sequences scored or decoded together."""
    device: str = "auto"
    """auto (cuda > mps > cpu) | cpu | cuda | mps."""
    dtype: Dtype = "auto"
    """auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16."""
    quantize: Quantize = "none"
    """none | int8: score the model with int8 weights (gpt.quant), as sample.py's quantize."""
    out: str | None = None
    """Also write the results as JSON to this file."""

    def __post_init__(self) -> None:
        for key in ("num_fewshot", "limit"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 0")
        for key in ("max_new_tokens", "batch_size", "cloze_n"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if not self.tasks:
            raise ConfigError("tasks is empty; e.g. tasks=[cloze] or tasks=[my_tasks/capitals]")


@dataclass
class Task:
    name: str
    kind: Literal["multiple_choice", "generative"]
    test: list[dict[str, Any]]
    train: list[dict[str, Any]] | None
    source: str


# ------------------------------------------------------------------------------------- task files
def _check_item(obj: Any, where: str) -> str:
    """The kind of one parsed line, or DataError naming ``where`` (file:line) and the fix."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
    if "choices" in obj:
        choices, answer = obj["choices"], obj.get("answer")
        if "context" not in obj:
            raise DataError(f"{where}: missing field 'context' (multiple choice: context, choices, answer)")
        if not isinstance(obj["context"], str):
            raise DataError(f"{where}: 'context' must be a string")
        if not isinstance(choices, list) or not choices:
            raise DataError(f"{where}: 'choices' is an empty list or not a list; give at least two choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{where}: every choice must be a non-empty string")
        if "answer" not in obj:
            raise DataError(f"{where}: missing field 'answer' (the index of the right choice)")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer {answer!r} is out of range for {len(choices)} choices "
                            f"(an index 0..{len(choices) - 1})")  # fmt: skip
        return "multiple_choice"
    if "prompt" in obj or "messages" in obj:
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: 'prompt' must be a string")
        if "messages" in obj:
            problems = check_messages(obj["messages"], final_role="user")
            if problems:
                raise DataError(f"{where}: message {problems[0][0]}: {problems[0][1]}")
        if not isinstance(obj.get("answer"), str):
            what = "missing field 'answer'" if "answer" not in obj else "'answer' must be a string"
            raise DataError(f"{where}: {what} (generative: prompt or messages, and answer)")
        return "generative"
    raise DataError(f"{where}: an item needs 'context' and 'choices' (multiple choice) or 'prompt' / "
                    "'messages' (generative), with 'answer'")  # fmt: skip


def read_items(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """(kind, items) of a JSONL task file; every item carries its ``_where`` (file:line)."""
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    kind, items = None, []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg}); one JSON object a line") from None
        k = _check_item(obj, where)
        if kind is not None and k != kind:
            raise DataError(f"{where}: a {k.replace('_', ' ')} item in a file of {kind.replace('_', ' ')} "
                            "items; one kind per task file")  # fmt: skip
        kind = k
        items.append({**obj, "_where": where})
    if kind is None:
        raise DataError(f"task file {path} holds no items")
    return kind, items


def load_task(spec: str) -> Task:
    """A task from a directory (test.jsonl, train.jsonl) or a JSONL file (see the module doc)."""
    path = resolve_path(spec)
    if path.is_dir():
        test, train, name = path / "test.jsonl", path / "train.jsonl", path.name
    else:
        stem = path.name.removesuffix(".jsonl")
        test, name = path, stem.removesuffix("_test") if stem != "test" else path.parent.name
        train = path.with_name("train.jsonl") if stem == "test" else path.with_name(f"{name}_train.jsonl")
    if not test.is_file():
        raise DataError(f"task {spec}: {test} does not exist; a task is a JSONL file or a directory "
                        "holding test.jsonl")  # fmt: skip
    kind, items = read_items(test)
    train_items = None
    if train.is_file() and train != test:
        train_kind, train_items = read_items(train)
        if train_kind != kind:
            raise DataError(f"{train}: its items are {train_kind.replace('_', ' ')}, those of {test} {kind}")
    return Task(name, kind, items, train_items, str(test))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- few-shot
def fewshot_examples(task: Task, index: int, k: int, seed: int) -> list[dict[str, Any]]:
    """k examples for test item ``index``: from the train items, else from the other test items;
    the same for the same (seed, task, index)."""
    if k == 0:
        return []
    pool = task.train if task.train else [it for i, it in enumerate(task.test) if i != index]
    rng = random.Random(f"{seed}/{task.name}/{index}")  # a str seed is hashed stably (sha512)
    return rng.sample(pool, min(k, len(pool)))


def _shown_answer(item: dict[str, Any]) -> str:
    return item.get("target", item["answer"])  # regex tasks may show a literal "target" in few-shot


def mc_context(task: Task, index: int, cfg: TasksConfig) -> str:
    shots = fewshot_examples(task, index, cfg.num_fewshot, cfg.seed)
    parts = [f"{s['context']}{cfg.delimiter}{s['choices'][s['answer']]}" for s in shots]
    return cfg.fewshot_separator.join([*parts, task.test[index]["context"]])


def generative_prompt(task: Task, index: int, cfg: TasksConfig, tokenizer, chat: bool) -> list[int]:
    """The prompt ids of generative item ``index``: plain text, or a chat rendering."""
    item, shots = task.test[index], fewshot_examples(task, index, cfg.num_fewshot, cfg.seed)
    if not chat:
        if "prompt" not in item:
            raise ConfigError(f"{item['_where']}: 'messages' items need a chat model (tuned on dialogs); "
                              "give 'prompt' items, or chat=true")  # fmt: skip
        parts = [f"{s['prompt']}{cfg.delimiter}{_shown_answer(s)}" for s in shots if "prompt" in s]
        return tokenizer.encode(cfg.fewshot_separator.join([*parts, item["prompt"]]))
    history = []
    for s in shots:
        question = s["prompt"] if "prompt" in s else s["messages"][-1]["content"]
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": _shown_answer(s)}]
    messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
    k = int(messages[0]["role"] == "system")  # the examples go after the system prompt
    return render_prompt(tokenizer, [*messages[:k], *history, *messages[k:]])


# ----------------------------------------------------------------------------------------- scoring
def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's answer normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def matches(completion: str, answer: str, how: str) -> bool:
    if how == "exact":
        return completion.strip() == answer.strip()
    if how == "normalized":
        return normalize(completion) == normalize(answer)
    return re.search(answer, completion) is not None


def _stats(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-item scores."""
    n = len(values)
    mean = sum(values) / max(n, 1)
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / max(n, 1))


def score_multiple_choice(model: GPT, tokenizer, task: Task, cfg: TasksConfig) -> dict[str, list[float]]:
    """Per-item acc and acc_norm (1.0 right, 0.0 wrong)."""
    items = task.test[: cfg.limit] if cfg.limit else task.test
    contexts = [mc_context(task, i, cfg) for i in range(len(items))]
    # the delimiter goes before each choice, as in the few-shot examples
    requests = [(c, [cfg.delimiter + ch for ch in it["choices"]]) for c, it in zip(contexts, items)]
    scores = choice_logprobs(model, tokenizer, requests, cfg.batch_size)
    acc, acc_norm = [], []
    for it, s in zip(items, scores):
        # per byte of what was scored: the delimiter and the choice
        norm = [v / max(len((cfg.delimiter + ch).encode("utf-8")), 1) for v, ch in zip(s, it["choices"])]
        acc.append(float(max(range(len(s)), key=s.__getitem__) == it["answer"]))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == it["answer"]))
    return {"acc": acc, "acc_norm": acc_norm}


def score_generative(model: GPT, tokenizer, task: Task, cfg: TasksConfig, chat: bool
                     ) -> dict[str, list[float]]:  # fmt: skip
    items = task.test[: cfg.limit] if cfg.limit else task.test
    if cfg.match == "regex":
        for it in items:
            try:
                re.compile(it["answer"])
            except re.error as e:
                where, answer = it["_where"], it["answer"]
                raise DataError(f"{where}: answer {answer!r} is not a valid regex ({e})") from None
    prompts = [generative_prompt(task, i, cfg, tokenizer, chat) for i in range(len(items))]
    stop_ids = [tokenizer.special_id(EOT_TURN), tokenizer.eot_id] if chat else [tokenizer.eot_id]
    stop = () if chat else cfg.stop
    done = greedy_batch(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size, stop, stop_ids)
    completions = [c.text for c in done]
    metric = {"exact": "exact_match", "normalized": "match", "regex": "regex_match"}[cfg.match]
    return {metric: [float(matches(c, it["answer"], cfg.match)) for c, it in zip(completions, items)]}


def cloze_task(text_cfg: TextConfig, n: int, seed: int, tokenizer=None) -> Task:
    """The cloze task (``gpt.eval.cloze``) as a multiple-choice task of this runner (``tokenizer``:
    the model's, which a val split is cut by)."""
    items = cloze_items("\n".join(read_texts(text_cfg, tokenizer)), n=n, seed=seed)
    return Task("cloze", "multiple_choice", [{**it, "_where": "cloze"} for it in items], None, text_cfg.path)


class TaskSuite:
    """Tasks loaded once and scored on any model (the training loop scores the suite at each eval).
    ``text`` is where the cloze task takes its held-out text (cut by ``tokenizer``'s tokens)."""

    def __init__(self, specs: Sequence[str], cfg: TasksConfig, text: TextConfig | None = None,
                 tokenizer=None) -> None:  # fmt: skip
        self.cfg = cfg
        self.tasks = []
        for spec in specs:
            if spec == "cloze":
                if text is None:
                    raise ConfigError("the cloze task needs a text: a run trained on a text corpus")
                # cloze items have no delimiter: the context ends where the continuation starts
                self.tasks.append(cloze_task(text, cfg.cloze_n, cfg.seed, tokenizer))
            else:
                self.tasks.append(load_task(spec))

    def score(self, model: GPT, tokenizer, chat: bool = False) -> dict[str, dict[str, Any]]:
        """{task: {"kind", "n", "num_fewshot", "metrics": {name: mean}, "stderr": {name: se}}}."""
        was_training = model.training
        model.eval()
        results = {}
        try:
            for task in self.tasks:
                cfg = self.cfg
                if task.name == "cloze":  # choices follow the context directly, no few-shot
                    cfg = TasksConfig(**{**vars(self.cfg), "delimiter": "", "num_fewshot": 0})
                if task.kind == "multiple_choice":
                    per_item = score_multiple_choice(model, tokenizer, task, cfg)
                else:
                    per_item = score_generative(model, tokenizer, task, cfg, chat)
                stats = {name: _stats(values) for name, values in per_item.items()}
                n = len(next(iter(per_item.values())))
                results[task.name] = {"kind": task.kind, "source": task.source, "n": n,
                                      "num_fewshot": cfg.num_fewshot,
                                      "metrics": {k: round(m, 6) for k, (m, _) in stats.items()},
                                      "stderr": {k: round(se, 6) for k, (_, se) in stats.items()}}
        finally:
            model.train(was_training)
        return results


def evaluate_tasks(cfg: TasksConfig) -> dict[str, Any]:
    device = pick_device(cfg.device)
    loaded = load(cfg.ckpt)
    model, tokenizer, state = loaded.build(device, cfg.quantize), loaded.tokenizer, loaded.state
    data = state.get("config", {}).get("data", {})
    chat = cfg.chat if cfg.chat is not None else data.get("format") == "dialogs"
    text = None
    if data.get("format", "text") == "text" and data.get("path"):
        field_name = data.get("text_field") or data.get("jsonl_field") or "text"
        text = TextConfig(path=data["path"], jsonl_field=field_name, split="val",
                          val_fraction=data.get("val_fraction") or 0.1,
                          cache_dir=data.get("cache_dir"))  # fmt: skip
    suite = TaskSuite(cfg.tasks, cfg, text, tokenizer)
    t0 = time.time()
    with autocast_for(device, resolve_dtype(cfg.dtype, device)):
        results = suite.score(model, tokenizer, chat)
    return {"ckpt": cfg.ckpt, "chat": chat, "seed": cfg.seed, "tasks": results,
            "seconds": round(time.time() - t0, 1)}  # fmt: skip


def report(result: dict[str, Any]) -> str:
    lines = [f"{result['ckpt']}" + (" (chat template)" if result.get("chat") else ""),
             f"{'task':<20} {'n':>6} {'shots':>5}  {'metric':<12} {'value':>8} {'stderr':>8}"]  # fmt: skip
    for name, t in result["tasks"].items():
        for metric, value in t["metrics"].items():
            lines.append(f"{name:<20} {t['n']:>6} {t['num_fewshot']:>5}  {metric:<12} {value:>8.4f} "
                         f"{t['stderr'][metric]:>8.4f}")  # fmt: skip
    lines.append(f"({result['seconds']:.0f} s)")
    return "\n".join(lines)
