"""Inference: the decoding core (``engine``: KV cache, prefill/decode, next-token choice), sampling and
beam search with streamed text (``generate``), the prompt loop (``repl``), the chat loop
(``chat_repl``) and ``sample.py``'s job (``sample``)."""
