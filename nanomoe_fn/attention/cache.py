"""The compressed MLA KV cache as pytrees: contiguous per sequence, or paged with a block table.

Dimension legend: B sequences, S new tokens per sequence, L_max capacity per sequence, Dc = C + Dr
cache row (normalised latent, then the roped shared key), P pages, G page size, M pages per sequence.

A cache row at position p of sequence b lives at kv[b, p] (ContiguousCache) or at
kv[block_table[b, p // G], p % G] (PagedCache). `lens [B] int32` counts the rows written so far.
Writes go into the kv buffer in place (the buffer is donated, as in JAX): the cache returned by
`write_rows` shares it and carries new lens. Positions are right-padded with -1 where a sequence has
fewer new tokens than S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomoe_fn.checks import check_int_field
from nanomoe_fn.tree import register_dataclass


@dataclass(frozen=True, eq=False)
class ContiguousCache:
    """kv [B, L_max, Dc]; lens [B] int32 rows written per sequence."""

    kv: torch.Tensor
    lens: torch.Tensor

    @property
    def batch(self) -> int:
        """B, the sequences."""
        return int(self.kv.shape[0])

    @property
    def capacity(self) -> int:
        """L_max, the most rows one sequence can hold."""
        return int(self.kv.shape[1])


@dataclass(frozen=True, eq=False)
class PagedCache:
    """kv [P, G, Dc] pages; block_table [B, M] int32 page ids; lens [B] int32."""

    kv: torch.Tensor
    block_table: torch.Tensor
    lens: torch.Tensor

    @property
    def batch(self) -> int:
        """B, the sequences."""
        return int(self.block_table.shape[0])

    @property
    def capacity(self) -> int:
        """M * G, the most rows one sequence can hold."""
        return int(self.block_table.shape[1] * self.kv.shape[1])


register_dataclass(ContiguousCache)
register_dataclass(PagedCache)
MLACache = ContiguousCache | PagedCache


def init_contiguous_cache(batch: int, capacity: int, cache_dim: int, dtype: torch.dtype,
                          device: torch.device | str = "cpu") -> ContiguousCache:
    """An empty contiguous cache of `batch` sequences, `capacity` rows each."""
    _check_sizes("init_contiguous_cache", dtype, batch=batch, capacity=capacity, cache_dim=cache_dim)
    return ContiguousCache(kv=torch.zeros(batch, capacity, cache_dim, dtype=dtype, device=device),
                           lens=torch.zeros(batch, dtype=torch.int32, device=device))


def init_paged_cache(batch: int, capacity: int, cache_dim: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu", page_size: int = 64, num_pages: int | None = None,
                     generator: torch.Generator | None = None) -> PagedCache:
    """An empty paged cache: each sequence gets ceil(capacity / page_size) pages of `num_pages`.

    With a generator the pages are handed out in a random order (tests use this to prove the block
    table is honoured); otherwise sequence b holds pages b*M .. b*M + M - 1.
    """
    _check_sizes("init_paged_cache", dtype, batch=batch, capacity=capacity, cache_dim=cache_dim, page_size=page_size)
    m = -(-capacity // page_size)
    num_pages = batch * m if num_pages is None else check_int_field("init_paged_cache", "num_pages", num_pages)
    if num_pages < batch * m:
        raise ValueError(f"num_pages must be >= batch * ceil(capacity / page_size) = {batch * m}, "
                         f"got {num_pages}")
    order = (torch.randperm(num_pages, generator=generator) if generator is not None
             else torch.arange(num_pages))
    table = order[: batch * m].reshape(batch, m).to(device=device, dtype=torch.int32)
    return PagedCache(kv=torch.zeros(num_pages, page_size, cache_dim, dtype=dtype, device=device),
                      block_table=table, lens=torch.zeros(batch, dtype=torch.int32, device=device))


def _check_sizes(owner: str, dtype: object, **sizes: object) -> None:
    """Positive int sizes (bool and float refused) and a floating dtype; TypeError/ValueError naming the one."""
    for name, v in sizes.items():
        check_int_field(owner, name, v)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{owner}.dtype must be a floating torch.dtype, got {dtype!r}")


def check_cache(cache: MLACache, batch: int, cache_dim: int, device: torch.device) -> None:
    """Shape/dtype checks that need no host sync; raises ValueError/TypeError naming the field."""
    if not isinstance(cache, (ContiguousCache, PagedCache)):
        raise TypeError(f"cache must be a ContiguousCache or PagedCache, got {type(cache).__name__}")
    kv = cache.kv
    if kv.dim() != 3 or kv.shape[-1] != cache_dim:
        raise ValueError(f"cache.kv must be [*, *, Dc={cache_dim}], got {tuple(kv.shape)}")
    if not kv.is_floating_point():
        raise TypeError(f"cache.kv must be floating point, got {kv.dtype}")
    if cache.batch != batch:
        raise ValueError(f"cache holds {cache.batch} sequences but x has batch {batch}")
    if cache.lens.shape != (batch,) or cache.lens.dtype != torch.int32:
        raise ValueError(f"cache.lens must be [B={batch}] int32, got {tuple(cache.lens.shape)} "
                         f"{cache.lens.dtype}")
    bt = cache.block_table if isinstance(cache, PagedCache) else None
    if bt is not None and (bt.dim() != 2 or bt.dtype != torch.int32):
        raise ValueError(f"cache.block_table must be [B, M] int32, got {tuple(cache.block_table.shape)} "
                         f"{cache.block_table.dtype}")
    if kv.device != device:
        raise ValueError(f"cache is on {kv.device} but x is on {device}")


def check_positions(cache: MLACache, positions: torch.Tensor, allow_padding: bool = True) -> None:
    """Value checks of positions [B, S] against the cache. Syncs with the host once (reads flags).

    Each row must be consecutive positions then trailing -1 padding (none if not allow_padding),
    start at or before lens[b] (no unwritten gap), and stay below the capacity; used pages must exist.
    """
    pos = positions.long()
    valid = pos >= 0
    first = torch.where(valid[:, :1], pos[:, :1], torch.zeros_like(pos[:, :1]))[:, 0]
    steps = torch.arange(pos.shape[1], device=pos.device)
    bad_order = (valid & (pos != first[:, None] + steps)).any() | (valid[:, 1:] & ~valid[:, :-1]).any()
    flags = torch.stack([
        (pos < (-1 if allow_padding else 0)).any(), (pos >= cache.capacity).any(), bad_order,
        (valid[:, 0] & (first > cache.lens.long())).any(),
    ])
    if isinstance(cache, PagedCache):
        pages = cache.block_table.long()
        page_start = torch.arange(pages.shape[1], device=pos.device) * cache.kv.shape[1]
        used = page_start <= pos.max(1).values[:, None]
        flags = torch.cat([flags, ((pages < 0) | (pages >= cache.kv.shape[0]))[used].any()[None]])
    f = flags.tolist()  # the one host sync, documented above
    names = ["positions must be >= -1 (-1 marks padding)" if allow_padding else
             "positions must be >= 0 (no padding when S == 1)",
             f"positions must be < the cache capacity {cache.capacity}",
             "each row of positions must be consecutive, padding (-1) only at the end",
             "a sequence's first new position must be <= cache.lens (no unwritten gap)",
             f"cache.block_table must hold page ids in [0, {cache.kv.shape[0]}) for used pages"]
    for ok_flag, msg in zip(f, names):
        if ok_flag:
            raise ValueError(msg)


def slots(cache: MLACache, positions: torch.Tensor) -> torch.Tensor:
    """[B, S] int64 flat row index into cache.kv.view(-1, Dc) of each position (-1 positions undefined)."""
    pos = positions.long().clamp_min(0)
    if isinstance(cache, ContiguousCache):
        b = torch.arange(pos.shape[0], device=pos.device)[:, None]
        return b * cache.capacity + pos
    g = cache.kv.shape[1]
    page = torch.gather(cache.block_table.long(), 1, torch.div(pos, g, rounding_mode="floor"))
    return page * g + pos % g


def write_rows(cache: MLACache, rows: torch.Tensor, positions: torch.Tensor) -> MLACache:
    """Store rows [B, S, Dc] at positions [B, S] (in place) and return the cache with new lens.

    With S == 1 every position must be valid (decode): no host sync. With S > 1 padded slots are
    dropped by boolean indexing, which syncs (prefill only).
    """
    flat = cache.kv.view(-1, cache.kv.shape[-1])
    idx = slots(cache, positions)
    if positions.shape[1] == 1:
        flat.index_copy_(0, idx.reshape(-1), rows.reshape(-1, rows.shape[-1]).to(flat.dtype))
    else:
        valid = positions >= 0
        flat.index_copy_(0, idx[valid], rows[valid].to(flat.dtype))
    new_lens = torch.maximum(cache.lens, (positions.max(dim=1).values + 1).to(torch.int32))
    if isinstance(cache, ContiguousCache):
        return ContiguousCache(kv=cache.kv, lens=new_lens)
    return PagedCache(kv=cache.kv, block_table=cache.block_table, lens=new_lens)


def gather_rows(cache: MLACache, length: int, upto: torch.Tensor | None = None) -> torch.Tensor:
    """[B, length, Dc] copy (or view) of each sequence's first `length` rows, for the expanded path.

    A sequence's pages past its own rows may be unallocated (check_positions only checks used pages): page ids
    are clamped into [0, P) for the read. upto [B]: rows at or past upto[b] come back zero, since they may hold
    stale or never-written values (NaN from torch.empty, another sequence's page) that a 0 attention weight
    would not cancel (0 * NaN). No host sync."""
    if isinstance(cache, ContiguousCache):
        rows = cache.kv[:, :length]
    else:
        g = cache.kv.shape[1]
        m = -(-length // g)
        pages = cache.kv[cache.block_table[:, :m].long().clamp(0, cache.kv.shape[0] - 1)]   # [B, m, G, Dc]
        rows = pages.flatten(1, 2)[:, :length]
    if upto is None:
        return rows
    keep = torch.arange(rows.shape[1], device=rows.device) < upto.to(rows.device)[:, None]
    return torch.where(keep[..., None], rows, 0)
