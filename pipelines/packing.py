"""Token-packed generate calls: which rows share one ``generate``, and how many tokens fit.

Rows are counted in prompt tokens (visual + text, from the processor's output). A call of n
rows whose longest prompt has ``m`` tokens occupies ``n·m`` token slots (left padding
included), so the packer sorts rows by length and fills each call while ``n·m ≤ T`` (the
token budget) and ``n ≤ R`` (``--batch-size``). Sorting puts rows of similar length together,
which is what keeps padding low; with pruning (``ep_core``) rows of different visual-token
counts may share a call.
"""

from __future__ import annotations

from dataclasses import dataclass

from ep_core.flops import kv_cache_bytes, text_dims

CPU_BATCH_TOKENS = 16_384  # the default token budget on CPU, where memory is not the limit
GPU_MEMORY_SHARE = 0.8  # of the free device memory after the model is loaded


@dataclass(frozen=True)
class Call:
    """One generate call: ``rows`` (indices into the packed list) and its token arithmetic."""

    rows: tuple[int, ...]
    longest: int  # tokens of its longest prompt
    tokens: int  # real prompt tokens, Σ lengths

    @property
    def slots(self) -> int:
        """Token slots the call occupies: rows × longest prompt."""
        return len(self.rows) * self.longest

    @property
    def padding_share(self) -> float:
        """1 − Σ lengths / (rows · longest): the share of the call's slots that are padding."""
        return 1.0 - self.tokens / self.slots if self.slots else 0.0


def pack(lengths: list[int], batch_tokens: int, max_rows: int) -> list[Call]:
    """Pack rows of ``lengths`` tokens into calls with ``rows · longest ≤ batch_tokens`` and
    ``rows ≤ max_rows``; each row in exactly one call. Rows are taken shortest first; a row
    longer than the budget on its own gets a call of its own."""
    if batch_tokens < 1 or max_rows < 1:
        raise ValueError(f"batch_tokens and max_rows must be >= 1, got {batch_tokens} and {max_rows}")
    calls: list[Call] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        length = lengths[index]
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * length > batch_tokens):
            calls.append(_call(current, lengths))
            current = []
        current.append(index)
    if current:
        calls.append(_call(current, lengths))
    return calls


def _call(rows: list[int], lengths: list[int]) -> Call:
    return Call(rows=tuple(rows), longest=max(lengths[i] for i in rows), tokens=sum(lengths[i] for i in rows))


def call_of(lengths: list[int]) -> Call:
    """The :class:`Call` of rows of ``lengths`` tokens run together."""
    return _call(list(range(len(lengths))), lengths)


def rows_allowed(lengths: list[int], batch_tokens: int, max_rows: int) -> float:
    """Rows per call the budget allows these rows with no padding at all: min(R, T / mean
    length), at least 1 — the bound packing is measured against."""
    if not lengths:
        return 0.0
    mean = sum(lengths) / len(lengths)
    return min(float(max_rows), max(1.0, batch_tokens / mean))


def default_batch_tokens(config, *, free_bytes: int | None, dtype_bytes: int, max_rows: int, max_new_tokens: int) -> int:
    """The token budget for one generate call.

    On CPU (``free_bytes`` None): ``CPU_BATCH_TOKENS``. On a GPU, from the free memory F after
    loading the model, the KV-cache bytes per token κ = 2·L·Hkv·hd·bytes and the transient
    prefill activations per token α = bytes·(4·D + 3·I) (hidden states, q/k/v/o, the MLP's
    gate/up/down of width I):

        T = ⌊(s·F − R·G·κ) / (κ + α)⌋,   s = 0.8, R rows × G new tokens of decode growth,

    at least 1. The cache is counted unpruned (pruning only lowers it).
    """
    if free_bytes is None:
        return CPU_BATCH_TOKENS
    dims = text_dims(config)
    per_token_cache = kv_cache_bytes(dims, 1, dtype_bytes=dtype_bytes)
    per_token_activation = dtype_bytes * (4 * dims.hidden_size + 3 * dims.intermediate_size)
    usable = GPU_MEMORY_SHARE * free_bytes - max_rows * max_new_tokens * per_token_cache
    return max(1, int(usable // (per_token_cache + per_token_activation)))


class CallTally:
    """What output rows say about their generate calls, added up batch by batch (the driver
    holds five numbers, not the rows). Rows without ``generate_rows`` are skipped. A row of a
    call of n rows counts 1/n of that call:

        calls = Σ 1/n,   rows_per_generate = rows / calls,
        padding_share = Σ padding/n / calls   (the mean over calls),
        generate_s = Σ latency/n,   span = last call's end − first call's start.
    """

    COLUMNS = ("generate_rows", "padding_share", "latency_ms", "generated_at", "oom_splits")

    def __init__(self) -> None:
        self.rows = self.oom_split_rows = 0
        self.calls = self.padding = self.generate_s = 0.0
        self.first, self.last = float("inf"), float("-inf")

    def add(self, rows: list[dict]) -> "CallTally":
        for row in rows:
            n = row.get("generate_rows")
            if not n:
                continue
            self.rows += 1
            self.calls += 1.0 / n
            self.padding += (row.get("padding_share") or 0.0) / n
            seconds = (row.get("latency_ms") or 0.0) / 1000.0
            self.generate_s += seconds / n
            self.oom_split_rows += bool(row.get("oom_splits"))
            if row.get("generated_at") is not None:
                self.first = min(self.first, row["generated_at"] - seconds)
                self.last = max(self.last, row["generated_at"])
        return self

    STATE = ("tally_rows", "tally_calls", "tally_padding", "tally_generate_s", "tally_oom_split_rows",
             "tally_first", "tally_last")

    def state(self) -> dict:
        """The seven numbers, named by :data:`STATE` (what a model worker sends the driver)."""
        return dict(zip(self.STATE, (self.rows, self.calls, self.padding, self.generate_s, self.oom_split_rows,
                                     self.first, self.last)))

    def merge(self, state: dict) -> "CallTally":
        """Add another tally's :meth:`state`: sums add up, the span takes the earliest start and
        the latest end."""
        self.rows += int(state["tally_rows"])
        self.calls += state["tally_calls"]
        self.padding += state["tally_padding"]
        self.generate_s += state["tally_generate_s"]
        self.oom_split_rows += int(state["tally_oom_split_rows"])
        self.first = min(self.first, state["tally_first"])
        self.last = max(self.last, state["tally_last"])
        return self

    def figures(self) -> dict:
        """``rows_per_generate``, ``padding_share``, ``generate_s``, ``span_s``,
        ``oom_split_rows``; empty when no row came from a generate call."""
        if not self.rows:
            return {}
        return {"rows_per_generate": self.rows / self.calls, "padding_share": self.padding / self.calls,
                "generate_s": self.generate_s, "span_s": max(0.0, self.last - self.first),
                "oom_split_rows": self.oom_split_rows}


def call_figures(rows: list[dict]) -> dict:
    """:meth:`CallTally.figures` of ``rows``."""
    return CallTally().add(rows).figures()
