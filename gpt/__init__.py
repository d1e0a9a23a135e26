"""gpt: a compact, fast, hackable framework for decoder-only GPT language models.

Entry points are ``train.py`` and ``sample.py`` at the repository root and the ``gpt`` command
(``gpt --help``). The library is a core (``gpt/*.py``: errors, typed configs, device policy, ranks,
model, ops, tokenizer, chat template, LoRA, checkpoint) and wings by concern: ``interop`` (Hugging
Face GPT-2), ``runs`` (the one loader), ``data``, ``train``, ``infer`` (the one KV cache and decode
loop), ``eval``, ``serve``, with the commands on top in ``gpt.commands``. A wing imports only the
core and the wings below it (``tests/test_layering.py`` enforces the arrows); docs/layout.md is the
map of which file does what.
"""

__version__ = "0.1.0"
