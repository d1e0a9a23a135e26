"""gpt: a compact, fast, hackable framework for decoder-only GPT language models.

Entry points are ``train.py`` and ``sample.py`` at the repository root; the library lives here:
``model`` (the network), ``tokenizer``, ``data`` (shards and batches), ``trainer`` (the one training
loop), ``generate`` (KV-cache sampling), ``checkpoint``, ``optim``, ``distributed`` and ``config``.
"""

__version__ = "0.1.0"
