"""``GET /metrics``: the server's counters and gauges in Prometheus' text format (version 0.0.4).

gpt_requests_total{endpoint="chat"} 12          # requests accepted, by endpoint
gpt_prompt_tokens_total 1024                    # tokens prefilled
gpt_completion_tokens_total 4096                # tokens generated
gpt_tokens_per_second 310.5                     # generated over the last 10 s
gpt_queue_depth 0                               # requests waiting for rows
gpt_batch_occupancy 3                           # rows decoding now (of gpt_batch_size)
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class Counters:
    """What the routes count (the model thread counts tokens in ``Batcher.stats``)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter({"completions": 0, "chat": 0})
        self.errors: dict[int, int] = {}
        self.rejected = 0  # 429: the queue was full


def render_metrics(service: Any) -> str:
    """The exposition text of ``service`` (a ``gpt.serve.app.Service``)."""
    stats, batcher, counters = service.batcher.stats, service.batcher, service.counters
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("gpt_requests_total", "counter", "Generation requests accepted, by endpoint.",
           [(f'{{endpoint="{k}"}}', v) for k, v in sorted(counters.requests.items())])  # fmt: skip
    metric("gpt_request_errors_total", "counter", "Requests answered with an error, by HTTP status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted(counters.errors.items())] or [("", 0)])  # fmt: skip
    metric("gpt_requests_finished_total", "counter", "Generation requests completed.",
           [("", stats.requests_finished)])  # fmt: skip
    metric("gpt_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats.prompt_tokens)])
    metric("gpt_completion_tokens_total", "counter", "Tokens generated.", [("", stats.completion_tokens)])
    metric("gpt_tokens_per_second", "gauge", "Tokens generated per second over the last 10 seconds.",
           [("", round(stats.tokens_per_second(), 3))])  # fmt: skip
    metric("gpt_queue_depth", "gauge", "Requests waiting for free batch rows.", [("", batcher.queue_depth)])
    metric("gpt_batch_occupancy", "gauge", "Batch rows decoding now.", [("", batcher.occupancy)])
    metric("gpt_batch_size", "gauge", "Batch rows available.", [("", batcher.max_batch)])
    mean = stats.step_rows / stats.steps if stats.steps else 0.0
    metric("gpt_batch_occupancy_mean", "gauge", "Mean rows per decode step since start.",
           [("", round(mean, 3))])  # fmt: skip
    metric("gpt_decode_steps_total", "counter", "Batched decode steps run.", [("", stats.steps)])
    return "\n".join(lines) + "\n"
