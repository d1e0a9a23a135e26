"""Data: reading text (``corpus``; Parquet and compressed files in ``readers``), token shards and
training windows (``shards``), cached parallel preparation (``prepare``) shared by the ranks of a job
(``parts``), which tokenizer a preset gets (``tokenizers``), dialog files (``dialogs``) and SFT
batches (``sft``). ``gpt prepare PATH`` prepares a corpus ahead of training."""
