"""Glue between the Hydra entry points (train.py, sample.py) and the library.

``hydra_main`` composes ``conf/`` with the command line's overrides; ``run`` turns the result into
a plain dict (so nothing in ``gpt/`` sees a Hydra object), calls the job, and turns a
``UserError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpt.errors import UserError


def _explain(e: Exception, conf_dir: Path, config_name: str) -> str:
    """One line for a Hydra/OmegaConf composition error: the key or preset, and the fix."""
    text = f"{e}\n{e.__cause__ or ''}"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    key = re.search(r"full_key: (\S+)", text) or re.search(r"Could not override '([^']+)'", text)
    if "not in struct" in text and key:
        parent, _, name = key.group(1).rpartition(".")
        valid = _keys_under(conf_dir, config_name, parent)
        return f"unknown config key '{key.group(1)}'" + (
            f"; valid keys under '{parent or 'top level'}': {valid}" if valid else ""
        )
    missing = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        return f"unknown preset {group}={name}; available: {', '.join(options)}"
    if "Missing mandatory value" in text:
        full = getattr(e, "full_key", None) or first.split(":")[-1].strip()
        return f"missing mandatory value {full}: set it on the command line ({full}=...)"
    return first


def _keys_under(conf_dir: Path, config_name: str, parent: str) -> str:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            node = compose(config_name=config_name)
        for part in filter(None, parent.split(".")):
            node = node[part]
        return ", ".join(str(k) for k in OmegaConf.to_container(node))
    except Exception:
        return ""


def hydra_main(job: Callable[[dict[str, Any]], Any], conf_dir: Path, config_name: str) -> Any:
    """Compose ``conf_dir/config_name.yaml`` with the command line's overrides and run ``job``.
    Composition mistakes (unknown key or preset, bad override syntax) print one line and exit 2.
    Hydra's own flags (--help, --cfg job, --multirun, ...) go to Hydra's regular command line."""
    args = sys.argv[1:]
    if any(a.startswith("-") for a in args):
        import hydra

        return hydra.main(config_path=str(conf_dir), config_name=config_name, version_base=None)(
            lambda cfg: run(job, cfg)
        )()
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None, job_name=config_name):
            cfg = compose(config_name=config_name, overrides=args)
        plain = to_plain(cfg)
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR"):
            raise
        print(f"error: {_explain(e, conf_dir, config_name)}", file=sys.stderr)
        sys.exit(2)
    return run(job, plain)


def to_plain(cfg: Any) -> dict[str, Any]:
    """A resolved plain dict from a Hydra/OmegaConf config (or a dict, returned as is)."""
    if isinstance(cfg, dict):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def run(job: Callable[[dict[str, Any]], Any], cfg: Any) -> Any:
    """Run ``job(plain_cfg)``; a user mistake prints ``error: ...`` and exits with status 2."""
    try:
        return job(to_plain(cfg))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.exit(2)
    except Exception as e:
        # OmegaConf interpolation errors and the like are configuration mistakes too
        if type(e).__module__.startswith("omegaconf") and not os.environ.get("HYDRA_FULL_ERROR"):
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        raise
