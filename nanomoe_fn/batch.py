"""The records that pass between the stages: Routing (route -> dispatch), ExpertBatch and Handle
(dispatch -> experts -> combine). Comms and stages import these records, never each other.

Dimension legend: T tokens on this rank, k experts per token, H hidden, P_local expert slots on this
rank, N (token, k) pairs this rank sends, M rows this rank's experts receive (batch rows), C fixed
capacity, R token rows a gathered batch reads its M rows from (R <= M usually: one token row per
received token, shared by its experts on this rank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nanomoe_fn.tree import register_dataclass

LAYOUTS = ("contiguous", "masked", "gathered")
FP8_GROUP = 128  # channels per activation scale of FP8 rows (DeepSeek-V3's 1 x 128)


@dataclass(frozen=True, eq=False)
class Routing:
    """route's output: topk_ids [T, k] int32 (logical experts, best first), topk_weights [T, k] float32."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """T."""
        return int(self.topk_ids.shape[0])


@dataclass(frozen=True, eq=False)
class ExpertBatch:
    """Rows for this rank's experts, in an explicit layout.

    layout "contiguous": x [M, H], rows sorted by local expert; counts [P_local] rows per expert
    (expert e owns rows offsets[e]:offsets[e] + counts[e], offsets = exclusive cumsum of counts).
    layout "masked": x [P_local, C, H]; expert e's rows are x[e, :counts[e]], the rest is padding.
    layout "gathered": x [R, H] token rows (any order; rows nobody reads are allowed), index [M] int32
    or int64, counts [P_local] summing to M: batch row m is x[index[m]], grouped by local expert as in
    "contiguous" (expert e owns batch rows offsets[e]:offsets[e] + counts[e]); a row of x may feed
    several batch rows. `materialize()` makes the contiguous batch [M, H]; expert outputs are always
    contiguous (`with_x`).
    index is None for the other layouts.
    x_scale: None for bf16/fp16/fp32 rows. FP8 rows (a comm that sends float8_e4m3fn, DeepSeek-V3's
    activation scheme): x float8_e4m3fn and x_scale float32 [..., H / 128] beside it (x's shape with the
    last dim in 128-channel groups; row value = x * its group's scale). Strided views are allowed (a comm's
    packed receive rows). Only FP8 expert backends take such a batch; their outputs are bfloat16.
    """

    x: torch.Tensor
    counts: torch.Tensor
    layout: str = "contiguous"
    index: torch.Tensor | None = None
    x_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor):  # counts and index are checked where they are read
            raise TypeError(f"ExpertBatch.x must be a torch.Tensor, got {type(self.x).__name__}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"ExpertBatch.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.layout == "gathered" and self.index is None:
            raise ValueError("ExpertBatch.index must be given for the 'gathered' layout (batch row m is x[index[m]])")
        if self.layout != "gathered" and self.index is not None:
            raise ValueError(f"ExpertBatch.index must be None for the {self.layout!r} layout (only 'gathered' "
                             f"batches read x through an index)")
        if (self.x.dtype == torch.float8_e4m3fn) != (self.x_scale is not None):
            raise ValueError("ExpertBatch.x_scale must be given exactly when x is float8_e4m3fn (FP8 rows and "
                             f"their per-128-channel scales), got x {self.x.dtype} and x_scale "
                             f"{None if self.x_scale is None else tuple(self.x_scale.shape)}")
        if self.x_scale is not None:
            want = (*self.x.shape[:-1], -(-self.x.shape[-1] // FP8_GROUP))
            if tuple(self.x_scale.shape) != want or self.x_scale.dtype != torch.float32:
                raise ValueError(f"ExpertBatch.x_scale must be float32 {list(want)} (one scale per row and "
                                 f"{FP8_GROUP} channels of x), got {self.x_scale.dtype} {tuple(self.x_scale.shape)}")

    @property
    def num_experts(self) -> int:
        """P_local, the local expert slots the batch is laid out for."""
        return int(self.counts.shape[0])

    @property
    def num_rows(self) -> int:
        """M, the batch rows of a contiguous or gathered batch (index.shape[0] when gathered)."""
        return int((self.x if self.index is None else self.index).shape[0])

    def with_x(self, x: torch.Tensor) -> ExpertBatch:
        """The same layout and counts with new rows (an expert stage's output); a gathered batch gives
        the contiguous batch (x [M, H] in batch row order, the same counts)."""
        if self.layout == "gathered":
            return ExpertBatch(x, self.counts, "contiguous")
        return replace(self, x=x, x_scale=None)

    def materialize(self) -> ExpertBatch:
        """Gathered -> contiguous (x.index_select(0, index): [M, H]); other layouts: self."""
        if self.layout != "gathered":
            return self
        scale = None if self.x_scale is None else self.x_scale.index_select(0, self.index)
        return ExpertBatch(self.x.index_select(0, self.index), self.counts, "contiguous", x_scale=scale)

    def offsets(self) -> torch.Tensor:
        """Exclusive cumsum of counts [P_local] (contiguous and gathered layouts): first row of each expert."""
        return torch.cumsum(self.counts, 0) - self.counts


@dataclass(frozen=True)
class HandleOrigin:
    """Which dispatch made a handle and what it delivered: host values only (static in the pytree).

    comm_id / call: the comm instance (a process-wide serial number, 0 = not recorded: made under
    torch.compile) and its dispatch call number (0 = not recorded). comm_name: the comm's `name`.
    layout, rows, hidden, dtype: the batch dispatch delivered, rows = its batch rows ((M,) contiguous
    and gathered, (P_local, C) masked). tokens, top_k: T and k of the dispatched routing.
    """

    comm_id: int
    call: int
    comm_name: str
    layout: str
    rows: tuple[int, ...]
    hidden: int
    dtype: torch.dtype
    tokens: int
    top_k: int

    def describe(self) -> str:
        """'a torch comm's dispatch #3 (contiguous [M=12, H=16] float32)' for error messages."""
        dims = ", ".join(f"{n}={v}" for n, v in zip(("P_local", "C") if self.layout == "masked" else ("M",),
                                                     self.rows))
        call = f"dispatch #{self.call}" if self.call else "dispatch"
        return f"a {self.comm_name} comm's {call} ({self.layout} [{dims}, H={self.hidden}] {self.dtype})"


@dataclass(frozen=True, eq=False)
class TokenRowPlan:
    """How a token-row comm (`torch`: one row per (token, destination rank)) moved rows, for its combine.

    pos [T, W] int64: the token's row among the rows sent to rank d (-1: none there). tab [W, C] int64: the
    count table sent (rows to each rank in column C - 2). pair_rows [R_in, k] int32/int64: per received row,
    each pair's batch row (-1: on another rank). pair_weights [R_in, k] float32: their weights (0 there).
    block_rows (static): 0 for exact splits; BS > 0 for fixed blocks (the decode mode, comm/torch_blocks.py:
    rank d's rows from row d * BS + 1 each way, batch rows flat over the masked batch; tab is then the blocks
    sent [W * BS, L], each header row holding that destination's count table row).
    """

    pos: torch.Tensor
    tab: torch.Tensor
    pair_rows: torch.Tensor
    pair_weights: torch.Tensor
    block_rows: int = 0


@dataclass(frozen=True, eq=False)
class Handle:
    """Everything combine needs to return expert rows to their tokens and reduce them.

    send_order [N] or None: flat (t * k + j) index of each sent row, rows in send order (sorted by slot);
    None for token-row comms (see token_rows).
    topk_weights [T, k] float32: the reduction weights.
    recv_order [M] or None: for each row of the expert batch, its index in the received buffer
    (None when the batch rows are the sent rows, as on one rank).
    send_splits / recv_splits: rows sent to / received from each rank (host ints; None on one rank).
    slot_pos [N] or None: fixed-capacity comms only: where each sent row sits in the [W * C] send
    buffer (C rows per destination rank).
    pack_index [W * C] or None: fixed-capacity comms only: for each received buffer row, its flat
    index in the masked batch [P_local * W * T_max] (P_local * W * T_max marks an empty row).
    token_rows: TokenRowPlan or None: token-row comms only (`torch`): the rows' places both ways.
    origin: which comm and dispatch call made the handle and the batch it delivered (host values,
    static in the pytree); None on a handle built by hand, which no comm's combine accepts.
    """

    send_order: torch.Tensor | None
    topk_weights: torch.Tensor
    recv_order: torch.Tensor | None = None
    send_splits: tuple[int, ...] | None = None
    recv_splits: tuple[int, ...] | None = None
    slot_pos: torch.Tensor | None = None
    pack_index: torch.Tensor | None = None
    token_rows: TokenRowPlan | None = None
    origin: HandleOrigin | None = None


def row_coords(batch: ExpertBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a contiguous or gathered batch: (local expert [M], slot within that expert [M])."""
    M, dev = batch.num_rows, batch.x.device
    expert = torch.repeat_interleave(torch.arange(batch.num_experts, device=dev), batch.counts, output_size=M)
    return expert, torch.arange(M, device=dev) - batch.offsets()[expert]


def to_masked(batch: ExpertBatch, capacity: int) -> ExpertBatch:
    """Contiguous (or gathered, materialized first) -> masked [P_local, capacity, H] (zero padding). An
    expert with more rows than `capacity` is an error (async on accelerators), never a silent drop."""
    from nanomoe_fn.checks import check_values

    if batch.layout not in ("contiguous", "gathered"):
        raise ValueError(f"to_masked expects a contiguous or gathered batch, got layout {batch.layout!r}")
    batch = batch.materialize()
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    if batch.num_experts:
        check_values(batch.counts.max() <= capacity,
                     f"an expert received more rows than the capacity ({capacity}); raise the capacity")
    expert, slot = row_coords(batch)
    xp = batch.x.new_zeros((batch.num_experts, capacity, batch.x.shape[1]))
    xp[expert, slot] = batch.x
    return ExpertBatch(xp, batch.counts, "masked")


def to_contiguous(masked: ExpertBatch, like: ExpertBatch) -> ExpertBatch:
    """Masked -> the contiguous row order of `like` (the batch that to_masked was given; a gathered
    `like` gives a contiguous batch)."""
    if masked.layout != "masked":
        raise ValueError(f"to_contiguous expects a masked batch, got layout {masked.layout!r}")
    expert, slot = row_coords(like)
    return like.with_x(masked.x[expert, slot])


register_dataclass(Routing)
register_dataclass(ExpertBatch, static=("layout",), optional=("index", "x_scale"))  # children when set
register_dataclass(TokenRowPlan, static=("block_rows",))
register_dataclass(Handle, static=("send_splits", "recv_splits", "origin"),
                   optional=("send_order", "recv_order", "slot_pos", "pack_index", "token_rows"))
