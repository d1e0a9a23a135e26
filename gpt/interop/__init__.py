"""Interop: Hugging Face GPT-2 conversion (``hf``: config and state-dict mapping, reading and writing
a Hugging Face directory) and its byte-level BPE vocab reader (``hf_vocab``)."""
