"""Serving a model over HTTP: an OpenAI-compatible API with continuous batching, and a chat page.

``gpt serve ckpt=DIR`` answers on http://127.0.0.1:8000:
``batcher`` (the model thread that decodes every running request as one batch), ``protocol``
(OpenAI's JSON shapes and the checks of every request field), ``app`` (the routes, errors, streams),
``metrics`` (Prometheus text), ``server`` (loading the model and running uvicorn) and
``static/chat.html`` (the self-contained chat page served at ``/``).
"""
