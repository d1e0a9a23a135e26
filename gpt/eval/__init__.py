"""Evaluation: scoring chat models on held-out dialogs (``dialogs``)."""
