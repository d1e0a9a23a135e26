"""The house rules of gpt/: wings by concern, arrows pointing one way, no import cycle.

Every import of every module (at the top, inside functions and in ``if __name__ == "__main__":``
blocks; a command never sits at a core module's path, it lives in ``gpt/commands/``) is read with
``ast``. The test fails on an import cycle, on an arrow the layers forbid, and on a function-level
import of our own modules (they hide cycles); only heavy optional dependencies may be imported
inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from gpt.typed_config import REPO_ROOT

PKG = REPO_ROOT / "gpt"

# the layers, bottom to top; a module may import its own layer (no cycles) and the layers listed
CORE = {"errors", "typed_config", "config", "stage_config", "device", "ops", "model", "tokenizer",
        "hf_tokenizer", "tokenizer_load", "chat_jinja", "chat_template", "tool_calls", "lora", "checkpoint",
        "dcp", "atomic", "ranks", "quant"}  # fmt: skip
ALLOWED = {
    "core": {"core"},
    "interop": {"core", "interop"},
    "runs": {"core", "interop", "runs"},
    "data": {"core", "interop", "data"},
    "infer": {"core", "interop", "runs", "infer"},
    "eval": {"core", "interop", "runs", "data", "infer", "eval"},
    "train": {"core", "interop", "runs", "data", "infer", "eval", "train"},  # GRPO samples with the engine
    "serve": {"core", "interop", "runs", "infer", "serve"},
    "commands": {"core", "interop", "runs", "data", "infer", "eval", "train", "serve", "commands"},
}
# which of our modules each core module may use (model.py stands alone on errors/config and its ops)
CORE_RULES = {
    "ops": set(),
    "model": {"errors", "config", "ops"},
    "checkpoint": {"errors", "config", "model", "atomic", "dcp"},  # the file format: nothing of LoRA or HF
    "dcp": {"errors", "atomic"},  # the sharded directory format under it
    "ranks": {"errors"},  # data preparation uses it: torch only inside its methods
    "typed_config": {"errors"},  # every config dataclass is read with it: it knows none of them
    "stage_config": {"errors", "typed_config"},  # groups of config.py's TrainRunConfig: below it
    "tokenizer": {"errors", "atomic"},  # the classes; the loaders (tokenizer_load) and HF's file sit above
}
# optional, heavy or slow-to-import dependencies that may be imported where they are used
LAZY_OK = {"transformers", "safetensors", "rustbpe", "matplotlib", "lm_eval", "pyarrow", "zstandard",
           "uvicorn", "fastapi", "starlette", "sse_starlette", "readline", "wandb", "resource",
           "torch", "hydra", "omegaconf", "inspect", "importlib", "yaml", "tokenizers", "jinja2", "gguf",
           "llama_cpp"}  # fmt: skip


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:  # the package itself
        return "commands"
    if parts[-1] == "__main__":
        return "commands"
    if len(parts) == 2:
        return "core" if parts[1] in CORE else "commands"
    return parts[1]


def _in_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
    return False


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function, line) for every import of ``path`` outside its
    TYPE_CHECKING block. ``from gpt.x import y`` counts as importing
    ``gpt.x.y`` when that is a module, else ``gpt.x``."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if _in_type_checking(node, parents):
            continue
        inner = _in_function(node, parents)
        if isinstance(node, ast.Import):
            found += [(a.name, inner, node.lineno) for a in node.names]
        elif node.level == 0 and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.append((full if is_module(full) else node.module, inner, node.lineno))
    return found


def is_module(name: str) -> bool:
    base = REPO_ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def graph() -> dict[str, list[tuple[str, bool, int]]]:
    return {
        module_name(p): [(m, inner, line) for m, inner, line in imports(p)] for p in sorted(PKG.rglob("*.py"))
    }


def violations(g: dict[str, list[tuple[str, bool, int]]]) -> list[str]:
    problems = []
    for mod, deps in g.items():
        for dep, inner, line in deps:
            top = dep.split(".")[0]
            if top != "gpt":
                if inner and top not in LAZY_OK and top not in sys.stdlib_module_names:
                    problems.append(f"{mod}:{line} imports {dep} inside a function")
                continue
            if dep == "gpt":
                continue
            if inner:
                problems.append(f"{mod}:{line} imports {dep} inside a function (imports at the top)")
            src, dst = layer(mod), layer(dep)
            if dst not in ALLOWED[src]:
                problems.append(f"{mod}:{line} ({src}) imports {dep} ({dst}): not allowed")
            short, dep_short = mod.split(".")[-1], dep.split(".")[-1]
            if src == "core" and short in CORE_RULES and dst == "core" and dep_short not in CORE_RULES[short]:
                problems.append(f"{mod}:{line} imports {dep}: {short}.py may use only {CORE_RULES[short]}")
    return problems


def cycles(g: dict[str, list[tuple[str, bool, int]]]) -> list[list[str]]:
    edges = {m: {d for d, _, _ in deps if d in g and d != m} for m, deps in g.items()}
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                found.append(stack[stack.index(d) :] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_no_import_cycle_anywhere():
    assert cycles(graph()) == []


def test_every_arrow_points_down():
    assert violations(graph()) == []


def test_the_checker_catches_a_forbidden_arrow_and_a_cycle():
    g = graph()
    g["gpt.model"] = [*g["gpt.model"], ("gpt.train.loop", False, 1)]  # core -> train
    g["gpt.infer.engine"] = [*g["gpt.infer.engine"], ("gpt.data.prepare", False, 1)]  # infer -> data
    g["gpt.checkpoint"] = [*g["gpt.checkpoint"], ("gpt.lora", False, 1)]  # checkpoint knows LoRA
    found = violations(g)
    assert any("gpt.model:1" in p and "gpt.train.loop" in p for p in found)
    assert any("gpt.infer.engine:1" in p for p in found)
    assert any("gpt.checkpoint:1" in p and "gpt.lora" in p for p in found)
    g["gpt.lora"] = [*g["gpt.lora"], ("gpt.checkpoint", False, 1)]
    assert cycles(g), "checkpoint -> lora -> checkpoint is a cycle"


def test_the_checker_reads_a_real_file(tmp_path, monkeypatch):
    """A forbidden import written into a module file is found by reading the file."""
    bad = tmp_path / "bad.py"
    bad.write_text("from gpt.train.loop import train\n\ndef f():\n    from gpt.data.prepare import prepare\n")
    with bad.open("a") as f:
        f.write('\nif __name__ == "__main__":\n    from gpt.commands.export import merge_main\n')
    found = imports(bad)
    assert ("gpt.train.loop", False, 1) in found and ("gpt.data.prepare", True, 4) in found
    assert any(m == "gpt.commands.export" for m, _, _ in found), "a __main__ block's import is an arrow too"


@pytest.mark.parametrize("module", ["gpt.infer.generate", "gpt.infer.sample", "gpt.chat_template"])
def test_inference_does_not_load_training_or_data(module):
    wings = "('gpt.train', 'gpt.data')"
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({wings})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} pulls in {out.strip()}"


def test_no_function_is_longer_than_60_lines():
    """A function that does not fit on a screen does more than one thing: split it by concern."""
    long = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{module_name(path)}.{node.name}: {lines} lines")
    assert long == []
