"""Prometheus text exposition (format 0.0.4), written by hand: counters, gauges and histograms
by model, thread-safe (the decode loops and the request handlers both write)."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HELP = {
    "kiln_queue_depth": ("gauge", "Requests waiting to be admitted to the batch."),
    "kiln_running_rows": ("gauge", "Rows in the continuous batch (prefilling or decoding)."),
    "kiln_requests_total": ("counter", "Requests answered, by endpoint and HTTP status."),
    "kiln_generated_tokens_total": ("counter", "Tokens generated."),
    "kiln_prompt_tokens_total": ("counter", "Prompt tokens prefilled."),
    "kiln_rejections_total": ("counter", "Requests refused or ended early, by reason."),
    "kiln_cancelled_rows_total": ("counter", ("Rows removed from the batch before they finished (disconnect, "
                                              "stop string, deadline, shutdown).")),
    "kiln_time_to_first_token_seconds": ("histogram", "From the request's arrival to its first token."),
    "kiln_inter_token_seconds": ("histogram", "Between two tokens of one request."),
    "kiln_step_seconds": ("histogram", "One scheduler step: prefill chunk(s) plus one decode step of the batch."),
}


def _labels(labels: tuple) -> str:
    if not labels:
        return ""
    text = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in labels)
    return "{" + text + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = defaultdict(dict)
        self._hist: dict[str, dict[tuple, list]] = defaultdict(dict)

    def inc(self, name: str, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def declare_histograms(self, **labels) -> None:
        """Every histogram shows its (empty) buckets for these labels before the first observation."""
        with self._lock:
            for name, (kind, _) in HELP.items():
                if kind == "histogram":
                    self._hist[name].setdefault(tuple(sorted(labels.items())), [[0] * len(LATENCY_BUCKETS), 0.0, 0])

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            h = self._hist[name].setdefault(key, [[0] * len(LATENCY_BUCKETS), 0.0, 0])
            for i, bound in enumerate(LATENCY_BUCKETS):
                if value <= bound:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._values[name].get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind != "histogram":
                    for key, v in sorted(self._values.get(name, {}).items()):
                        lines.append(f"{name}{_labels(key)} {v:g}")
                    continue
                for key, (buckets, total, count) in sorted(self._hist.get(name, {}).items()):
                    for bound, n in zip(LATENCY_BUCKETS, buckets):
                        lines.append(f"{name}_bucket{_labels(key + (('le', f'{bound:g}'),))} {n}")
                    lines.append(f"{name}_bucket{_labels(key + (('le', '+Inf'),))} {count}")
                    lines.append(f"{name}_sum{_labels(key)} {total:.6f}")
                    lines.append(f"{name}_count{_labels(key)} {count}")
        return "\n".join(lines) + "\n"
