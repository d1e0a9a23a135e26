"""Evaluation: ``scoring`` (the one log-likelihood scorer), ``bpb`` (bits per byte), ``cloze`` (a
4-way continuation task from any text), ``tasks`` (JSONL task files, few-shot, results), ``lm_eval``
(the lm-evaluation-harness model ``gpt``), ``dialogs`` (chat models on held-out dialogs). The
command is ``gpt eval bpb|cloze|tasks|dialogs``."""
