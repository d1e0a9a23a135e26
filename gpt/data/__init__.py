"""Data: reading text (``corpus``), token shards and training windows (``shards``), cached parallel
preparation (``prepare``), which tokenizer a preset gets (``tokenizers``), dialog files (``dialogs``)
and SFT batches (``sft``). ``python -m gpt.data PATH`` prepares a corpus ahead of training."""
