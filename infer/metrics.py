"""The server's counters, gauges and histogram, written in Prometheus text format."""
from __future__ import annotations

import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "orthrus"


class Metrics:
    """Thread-safe counters; gauges are read from callables when rendered."""

    def __init__(self, gauges: dict[str, tuple[str, object]]):
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, str], float] = {}
        self.gauges = gauges  # name -> (help, callable returning a number)
        self.ttft = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.help = {
            "requests_total": "Requests answered, by HTTP status",
            "prompt_tokens_total": "Prompt tokens of finished requests",
            "generation_tokens_total": "Tokens generated for finished requests",
            "forward_passes_total": "Forward passes of finished requests (prefill 1, orthrus "
                                    "cycle 2, AR step 1)",
            "draft_cycles_total": "Orthrus cycles of finished requests",
            "accepted_drafts_total": "Accepted (and emitted) drafts of finished requests",
            "draft_nodes_total": "Draft tokens the AR view verified (chain: K-1 a cycle; tree: "
                                 "the tree's nodes) for finished requests",
            "depth_accepted_total": "Orthrus cycles of finished requests whose draft at this "
                                    "depth (tree: the accepted path's node) was accepted and "
                                    "emitted",
            "cancelled_total": "Requests cancelled (client gone, stop string) before the end",
        }

    def inc(self, name: str, value: float = 1.0, label: str = "") -> None:
        with self.lock:
            self.counters[(name, label)] = self.counters.get((name, label), 0.0) + value

    def observe_ttft(self, seconds: float) -> None:
        with self.lock:
            for i, b in enumerate(TTFT_BUCKETS):
                if seconds <= b:
                    self.ttft[i] += 1
                    break
            else:
                self.ttft[-1] += 1
            self.ttft_sum += seconds

    def get(self, name: str, label: str = "") -> float:
        with self.lock:
            return self.counters.get((name, label), 0.0)

    def render(self) -> str:
        lines = []
        with self.lock:
            names = sorted({n for n, _ in self.counters} | set(self.help))
            for name in names:
                lines += [f"# HELP {PREFIX}_{name} {self.help.get(name, name)}",
                          f"# TYPE {PREFIX}_{name} counter"]
                labelled = [(lab, v) for (n, lab), v in self.counters.items() if n == name]
                for lab, v in sorted(labelled) or [("", 0.0)]:
                    lines.append(f"{PREFIX}_{name}{lab} {v:g}")
            acc = self.counters.get(("accepted_drafts_total", ""), 0.0)
            cyc = self.counters.get(("draft_cycles_total", ""), 0.0)
            tok = self.counters.get(("generation_tokens_total", ""), 0.0)
            fwd = self.counters.get(("forward_passes_total", ""), 0.0)
            derived = {"acceptance_length": ("Accepted drafts per Orthrus cycle, bonus excluded",
                                             acc / cyc if cyc else 0.0),
                       "tokens_per_forward": ("Generated tokens per forward pass (TPF)",
                                              tok / fwd if fwd else 0.0),
                       "nodes_per_cycle": ("Draft tokens verified per Orthrus cycle",
                                           self.counters.get(("draft_nodes_total", ""), 0.0)
                                           / cyc if cyc else 0.0)}
            depth = sorted(((lab, v / cyc if cyc else 0.0) for (n, lab), v in
                            self.counters.items() if n == "depth_accepted_total"),
                           key=lambda lv: int(lv[0].split('"')[1]))
            cum, bucket_lines = 0, []
            for b, c in zip(TTFT_BUCKETS + (float("inf"),), self.ttft):
                cum += c
                le = "+Inf" if b == float("inf") else f"{b:g}"
                bucket_lines.append(f'{PREFIX}_time_to_first_token_seconds_bucket{{le="{le}"}} '
                                    f"{cum}")
            ttft_sum, ttft_n = self.ttft_sum, cum
        for name, (hlp, value) in derived.items():
            lines += [f"# HELP {PREFIX}_{name} {hlp}", f"# TYPE {PREFIX}_{name} gauge",
                      f"{PREFIX}_{name} {value:g}"]
        lines += [f"# HELP {PREFIX}_depth_acceptance Orthrus cycles whose draft at this depth was "
                  "accepted, per cycle", f"# TYPE {PREFIX}_depth_acceptance gauge"]
        lines += [f"{PREFIX}_depth_acceptance{lab} {v:g}" for lab, v in depth]
        for name, (hlp, fn) in sorted(self.gauges.items()):
            lines += [f"# HELP {PREFIX}_{name} {hlp}", f"# TYPE {PREFIX}_{name} gauge",
                      f"{PREFIX}_{name} {float(fn()):g}"]  # type: ignore[operator]
        lines += [f"# HELP {PREFIX}_time_to_first_token_seconds Time from request to first "
                  "token", f"# TYPE {PREFIX}_time_to_first_token_seconds histogram"]
        lines += bucket_lines
        lines += [f"{PREFIX}_time_to_first_token_seconds_sum {ttft_sum:g}",
                  f"{PREFIX}_time_to_first_token_seconds_count {ttft_n}"]
        return "\n".join(lines) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """Sample name (with labels) -> value, from Prometheus text (tests and bench read this)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
