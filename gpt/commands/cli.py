"""The one command-line convention of every command: Hydra-style ``key=value`` overrides composed
with a YAML file of ``conf/``, bare words for the command's positional keys, free text passed
verbatim, and one error wrapper (a user mistake is one line on stderr and exit status 2).

    python train.py model=gpt2 optim.lr=3e-4                 # the defaults + presets + overrides
    python sample.py 'prompt=Hello, <|endoftext|> "you"'     # free text: never parsed by Hydra
    gpt prepare notes/ data.tokenizer=bpe             # a positional word: data.path

A command module declares a ``Command`` and calls ``main(job, command)``; ``job(cfg, given)``
receives the resolved config as a plain dict (nothing in ``gpt/`` sees a Hydra object) and the set
of dotted keys the user typed (``given``), so that a preset's value and a typed one can differ in
meaning (``init_from`` takes the shape from its checkpoint unless a shape key was typed).

Free-text keys (``prompt``, ``system``, ``stop``, ...) are taken out before Hydra sees the command
line, whose grammar rejects commas, quotes, ``|``, ``<`` and non-ASCII text: everything after the
first ``=`` reaches the model unchanged. A repeatable key (``stop=a stop=b``) gives a list, as does
a value in Hydra's list syntax (``stop='[" ", "END"]'``: its items).

One source of defaults: a command's config dataclass (``Command.schema``) is the schema. Its field
defaults are registered in Hydra's ConfigStore as ``NAME_schema`` when the command composes, the
YAML file of conf/ lists it first in its defaults list, and the YAML files hold only what a preset
changes. Its field docstrings are the keys' documentation: ``--help`` prints every key with its
composed value and its doc. Types and ranges are checked once, by the dataclass (``from_dict``).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import itertools
import json
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpt.errors import UserError
from gpt.typed_config import REPO_ROOT

CONF_DIR = REPO_ROOT / "conf"
Job = Callable[[dict[str, Any], frozenset[str]], Any]


@dataclass(frozen=True)
class Command:
    """How one command reads its command line."""

    config_name: str
    """The YAML file of conf/: the presets it composes."""
    schema: type
    """The config dataclass: its defaults and field docs are the keys'."""
    usage: str = ""
    """One line shown with a mistake in the arguments."""
    positional: tuple[str, ...] = ()
    """Keys that bare words (no ``=``) fill, in order: ``gpt prepare PATH`` sets data.path."""
    free_text: tuple[str, ...] = ()
    """Keys whose values pass verbatim (see the module docstring)."""
    repeatable: tuple[str, ...] = ()
    """Free-text keys that may be given more than once; their value is then a list."""


# ------------------------------------------------------------------------------- reading the args
def _list_items(key: str, value: str) -> list[Any]:
    """A repeatable key's value: a Hydra list (``stop=[" ", "END"]``) its items, else one verbatim string."""
    if not (value.startswith("[") and value.endswith("]")):
        return [value]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return list(OverridesParser.create().parse_override(f"{key}={value}").value())
    except Exception:  # Hydra's grammar error: the message is an ANTLR parse trace
        example = f"""{key}='[" ", "END"]'"""
        raise UserError(f"{key}={value} is not a list in Hydra's syntax: quote each item ({example}) "
                        f"or give {key}=TEXT once per string") from None  # fmt: skip


def split_args(argv: Sequence[str], command: Command) -> tuple[list[str], dict[str, Any], frozenset[str]]:
    """(Hydra overrides, free-text values by dotted key, keys the user typed)."""
    overrides: list[str] = []
    free: dict[str, Any] = {}
    given: set[str] = set()
    positional = list(command.positional)
    previous = ""
    for arg in argv:
        after_flag, previous = previous in FLAGS_WITH_VALUE, arg
        if after_flag:  # the value of Hydra's flag: --cfg job, --package ...
            overrides.append(arg)
            continue
        key, eq, value = arg.partition("=")
        if eq and key in command.free_text:
            if key in command.repeatable:
                free.setdefault(key, []).extend(_list_items(key, value))
            else:
                free[key] = value
            given.add(key)
            continue
        if not eq and not arg.startswith("-"):
            if not positional:
                raise UserError(f"unexpected argument {arg!r}: use key=value" + _usage(command))
            key = positional.pop(0)
            free[key] = arg  # a path or a name: verbatim as well
            given.add(key)
            continue
        overrides.append(arg)
        if eq:
            given.add(key.lstrip("+~"))
    return overrides, free, frozenset(given)


def _usage(command: Command) -> str:
    return f"; usage: {command.usage}" if command.usage else ""


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[last] = value


# -------------------------------------------------------------------------------------- composing
def _explain(e: Exception, command: Command) -> str:
    """One line for a Hydra/OmegaConf composition error: the key or preset, and the fix (Hydra's own
    hint kept where it gives one)."""
    text = f"{e}\n{e.__cause__ or ''}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(e).__name__
    key = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text)
    if "not in struct" in text and key:
        return _unknown_key(command, key.group(1))
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        return f"unknown preset {group}={name}; available: {', '.join(_presets(group))}"
    if "Missing mandatory value" in text:
        full = getattr(e, "full_key", None) or first.split(":")[-1].strip()
        return f"missing mandatory value {full}: set it on the command line ({full}=...)"
    grammar = next((line.split()[1] for line in lines if "override_grammar" in line), "")
    if grammar:  # a parse error: keep what Hydra points at (its caret) and where the grammar is
        raw = text.strip().splitlines()
        where, first = "", f"the overrides ({first})"
        if len(raw) > 1 and raw[1].strip() == "^" and ": " in raw[0]:
            column = len(raw[1]) - 1 - (raw[0].index(": ") + 2)
            override = raw[0].split(": ", 1)[1]
            if 0 <= column < len(override):
                where = f" at {override[column]!r} (column {column + 1})"
            first = f"the override {override}"
        return (f"cannot parse {first}{where}: put a value holding quotes, commas or brackets in quotes "
                f"of its own, e.g. 'key=\"it'\\''s, ok\"' in a shell (see {grammar})")  # fmt: skip
    hint = next((line for line in lines[1:] if "quot" in line.lower() or "escap" in line.lower()), "")
    return f"{first} ({hint})" if hint and hint not in first else first


def _unknown_key(command: Command, key: str) -> str:
    parent = key.rpartition(".")[0]
    valid = _keys_under(command, parent)
    where = f"; valid keys under '{parent or 'top level'}': {valid}" if valid else ""
    return f"unknown config key '{key}'{where}"


def _keys_under(command: Command, parent: str) -> str:
    from omegaconf import OmegaConf

    try:
        node = _compose(command, [])
        for part in filter(None, parent.split(".")):
            node = node[part]
        return ", ".join(str(k) for k in OmegaConf.to_container(node))
    except Exception:
        return ""


def _compose(command: Command, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register(command)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None, job_name=command.config_name):
        return compose(config_name=command.config_name, overrides=overrides)


def register(command: Command) -> None:
    """Store the defaults of ``command.schema`` in Hydra's ConfigStore as ``NAME_schema``, the
    first entry of the command's defaults list (done when composing, never at import)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=f"{command.config_name}_schema", node=defaults_of(command.schema))


def defaults_of(schema: type) -> dict[str, Any]:
    """Every key of config dataclass ``schema`` at its field default, nested groups as dicts; a
    field without a default is Hydra's mandatory ``???``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else lambda: "???"
        value = f.default if f.default is not dataclasses.MISSING else factory()
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def field_docs(schema: type, prefix: str = "") -> dict[str, str]:
    """{dotted key: its doc}: the string under each field of ``schema`` (its bases' and nested
    groups' too), on one line."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in schema.__mro__ if dataclasses.is_dataclass(k)]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body  # type: ignore[attr-defined]
        for node, doc in itertools.pairwise(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):  # fmt: skip
                docs[prefix + node.target.id] = " ".join(str(doc.value.value).split())
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            docs.update(field_docs(hints[f.name], f"{prefix}{f.name}."))
    return docs


def help_text(command: Command, argv: list[str]) -> str:
    """``--help`` of a command: the presets to choose from and every key with its value for these
    overrides and its doc."""
    import yaml

    plain, _ = compose_config(command, [a for a in argv if not a.startswith("-")], complete=False)
    listed = yaml.safe_load((CONF_DIR / f"{command.config_name}.yaml").read_text()).get("defaults", [])
    docs = field_docs(command.schema)
    groups = [next(iter(d)) for d in listed if isinstance(d, dict) and (CONF_DIR / next(iter(d))).is_dir()]
    lines = [f"usage: {command.usage or command.config_name}", ""]
    lines += [f"{group}=NAME presets (conf/{group}/): {', '.join(_presets(group))}" for group in groups]
    lines += [""] * bool(groups) + ["keys (key=value), with the value they take here:"]
    flat = _flatten(plain)
    width = min(48, max(len(f"{k}: {_show(v)}") for k, v in flat.items()))
    for key, value in flat.items():
        lines.append(f"  {f'{key}: {_show(value)}':<{width}}  # {docs.get(key, '')}".rstrip(" #"))
    return "\n".join(lines)


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value.strip() == value != "" else json.dumps(value)


def to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict from a Hydra/OmegaConf config (or a dict, returned as is)."""
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def compose_config(command: Command, argv: Sequence[str], complete: bool = True
                   ) -> tuple[dict[str, Any], frozenset[str]]:  # fmt: skip
    """The plain config of ``command`` for ``argv`` and the keys typed; UserError on any mistake (but a
    mandatory key left unset when not ``complete``: --help shows it as ???). Free text is set after
    composition and resolution, so Hydra never parses it and OmegaConf never interpolates it."""
    from omegaconf import OmegaConf

    overrides, free, given = split_args(argv, command)
    try:
        cfg = _compose(command, overrides)
        for key in free:
            parent, _, last = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or last not in node.keys():  # noqa: SIM118 -- `in` misses a mandatory ??? key
                raise UserError(_unknown_key(command, key))
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except UserError:
        raise
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR"):
            raise
        raise UserError(_explain(e, command)) from None
    for key, value in free.items():
        _set_dotted(plain, key, value)
    missing = _missing(plain) if complete else None
    if missing:
        raise UserError(f"missing mandatory value {missing}: set it on the command line ({missing}=...)")
    return plain, given


def _missing(d: Any, prefix: str = "") -> str | None:
    """The first dotted key whose value is still Hydra's mandatory marker ``???``."""
    if isinstance(d, dict):
        for k, v in d.items():
            found = _missing(v, f"{prefix}{k}.")
            if found:
                return found
    elif d == "???":
        return prefix.rstrip(".")
    return None


# ---------------------------------------------------------------------------------------- running
def run(job: Callable[..., Any], cfg: Any, given: frozenset[str] = frozenset()) -> Any:
    """Run ``job`` with the error wrapper: a user mistake prints ``error: ...`` and exits with 2."""
    with errors_as_exit():
        return _call(job, to_plain(cfg), given)


def _call(job: Callable[..., Any], cfg: dict[str, Any], given: frozenset[str]) -> Any:
    takes_given = len(inspect.signature(job).parameters) >= 2
    return job(cfg, given) if takes_given else job(cfg)


@contextlib.contextmanager
def errors_as_exit() -> Iterator[None]:
    """``UserError`` (and OmegaConf's interpolation errors, which are configuration mistakes too)
    become one ``error: ...`` line on stderr and exit status 2; a closed stdout (``| head``) ends the
    command quietly, as Unix tools do."""
    try:
        yield
    except BrokenPipeError:
        # point stdout at /dev/null so that the interpreter's final flush is silent
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, what a shell reports for a tool cut off by `head`
    except Exception as e:
        omegaconf = type(e).__module__.startswith("omegaconf") and not os.environ.get("HYDRA_FULL_ERROR")
        if not (isinstance(e, UserError) or omegaconf):
            raise
        message = " ".join(str(e).split("\n")[:1]) if not isinstance(e, UserError) else str(e)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(job: Job | Callable[[dict[str, Any]], Any], command: Command, argv: Sequence[str] | None = None
         ) -> Any:  # fmt: skip
    """The entry point of a command: read ``argv`` (default: ``sys.argv[1:]``), compose, run ``job``.
    Hydra's own flags (--help, --cfg job, --multirun, ...) go to Hydra's regular command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with errors_as_exit():
        flags = [a for a in argv if a.startswith("-")]  # before split_args: --key VALUE is a mistake
        if flags:
            _check_flags(flags, command)
            if {"-h", "--help"} & set(flags):
                print(help_text(command, argv), flush=True)
                return None
            return _hydra_flags(job, command, argv)
        cfg, given = compose_config(command, argv)
        return _call(job, cfg, given)


# Hydra's own command-line flags (hydra/_internal/utils.py get_args_parser), with and without a value
FLAGS_WITH_VALUE = (
    "-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd",
    "--config-dir", "--experimental-rerun", "-i", "--info", "-sc", "--shell-completion",
)  # fmt: skip
HYDRA_FLAGS = (*FLAGS_WITH_VALUE, "-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run",
               "-m", "--multirun")  # fmt: skip


def _check_flags(flags: list[str], command: Command) -> None:
    """A flag Hydra does not know is one line (not argparse's usage): ``--show`` -> ``show=N``."""
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in HYDRA_FLAGS:
            continue
        key = name.lstrip("-").replace("-", "_")
        if key in _keys_under(command, "").split(", "):
            raise UserError(f"{flag}: options are key=value here, e.g. {key}=..." + _usage(command))
        raise UserError(f"unknown option {flag}: use key=value (see --help)" + _usage(command))


def _hydra_flags(job, command: Command, argv: list[str]) -> Any:
    """``--help``, ``--cfg job``, ``-m``...: Hydra's own command line, free text still verbatim."""
    import hydra

    overrides, free, given = split_args(argv, command)
    sys.argv = [sys.argv[0], *overrides]
    register(command)

    def task(cfg) -> Any:
        plain = to_plain(cfg)
        for key, value in free.items():
            _set_dotted(plain, key, value)
        with errors_as_exit():
            return _call(job, plain, given)

    entry = hydra.main(config_path=str(CONF_DIR), config_name=command.config_name, version_base=None)(task)
    try:
        return entry()
    except ValueError as e:  # Hydra's check of its own flags ("Only one of --run, --multirun, ...")
        if "can be specified" not in str(e):
            raise
        raise UserError(f"{e}{_usage(command)}") from None
