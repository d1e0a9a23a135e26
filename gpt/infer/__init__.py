"""Inference: the decoding core (``engine``: the KV cache, prefill/decode steps), each row's next-token
choice and text (``sampling``), the decode loop with sampling, beam search and evaluation's greedy
batches (``generate``), the prompt loop (``repl``), the chat loop (``chat_repl``) and ``sample.py``'s
job (``sample``)."""
