"""Placement tables and the static logical -> physical remap."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomoe_fn import Placement


@given(E=st.integers(1, 32), W=st.sampled_from([1, 2, 4]), extra_per_rank=st.integers(0, 3),
       T=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_tables_and_static_remap(E, W, extra_per_rank, T, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(E)
    pad = (-E) % W  # make the slots divide over the ranks
    phy2log = torch.cat([base, torch.randint(0, E, (pad + W * extra_per_rank,), generator=gen)])
    phy2log = phy2log[torch.randperm(phy2log.numel(), generator=gen)]
    pl = Placement.from_phy2log(phy2log, E, W)
    assert int(pl.logcnt.sum()) == pl.num_physical and int(pl.logcnt.min()) >= 1
    for e in range(E):
        reps = pl.log2phy[e][pl.log2phy[e] >= 0]
        assert len(reps) == int(pl.logcnt[e]) and bool((phy2log[reps] == e).all())
    k = min(E, 4)
    ids = torch.empty(0, k, dtype=torch.long)
    if T:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    for rank in range(W):
        phys = pl.physical_ids(ids.long(), rank)
        assert bool((pl.phy2log[phys] == ids).all()), "remap picked a replica of another expert"
        on_rank = (phys // pl.local_experts) == rank
        has_local = torch.stack([((pl.log2phy[ids] // pl.local_experts) == rank) & (pl.log2phy[ids] >= 0)]).any(-1)[0]
        assert bool((on_rank == has_local).all()), "same-rank replica not preferred"


def test_placement_errors():
    with pytest.raises(ValueError, match="every logical expert"):
        Placement.from_phy2log(torch.tensor([0, 0, 1, 1]), 3, 2)
    with pytest.raises(ValueError, match=r"phy2log entries must lie in \[0, 2\)"):
        Placement.from_phy2log(torch.tensor([0, 2]), 2, 1)
    with pytest.raises(ValueError, match="rank must lie"):
        Placement.identity(4, 2).local_slots(2)
