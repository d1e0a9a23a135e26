"""Glue between the Hydra entry points (train.py, sample.py) and the library.

Hydra composes ``conf/``; ``run`` turns the result into a plain dict (so nothing in ``gpt/`` sees a
Hydra object), calls the job, and turns a ``UserError`` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from gpt.errors import UserError


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
