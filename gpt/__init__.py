"""gpt: a compact, fast, hackable framework for decoder-only GPT language models.

Entry points are ``train.py`` and ``sample.py`` at the repository root and the ``gpt`` command
(``gpt --help``). The library is a core and wings by concern; a wing imports only the core and the
wings below it (``tests/test_layering.py`` enforces the arrows):

- core (``gpt/*.py``): ``errors``, ``config`` (typed dataclasses), ``device`` (device, the one dtype
  policy, peak-FLOPs probe), ``model`` (the network), ``tokenizer``, ``chat_template`` (dialogs to
  ``(ids, loss_mask)`` and prompts), ``lora`` (the layer), ``checkpoint`` (the file format), ``atomic``.
- ``gpt.interop``: Hugging Face GPT-2 conversion and its vocab reader.
- ``gpt.runs``: rebuilding a model from a run, a LoRA run or ``hf:DIR``; a run's metrics.
- ``gpt.data``: corpus reading, token shards and their cache, dialog files, SFT batches.
- ``gpt.train``: the one loop, run setup, where weights start, optimizer, distributed, monitor.
- ``gpt.infer``: the generation engine, the REPLs, ``sample.py``'s job.
- ``gpt.eval``: evaluation (bits per byte, cloze, task files, lm-eval adapter, dialogs).
- ``gpt.serve``: the OpenAI-compatible HTTP server (continuous batching) and its chat page.
- commands on top: ``cli`` (the command-line convention), ``commands``, ``chat``, ``evaluate``,
  ``export``, ``bench``, ``plot``, ``__main__``, and each wing's ``__main__``.
"""

__version__ = "0.1.0"
