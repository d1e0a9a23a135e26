"""Run directories: rebuilding a model from a run, a checkpoint file, a LoRA run or ``hf:DIR``
(``gpt.runs.load``), and reading a run's records (``gpt.runs.metrics``)."""
