"""Triton fused MoE (kernels/moe_align, kernels/fused_moe) against the float64 oracle, on the CPU.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate, cap rows per expert (masked).
The kernels run under TRITON_INTERPRET=1, set before kernels/ is imported (the interpreter gets
bfloat16 wrong: float32/float16 here, bfloat16 in tests/gpu/test_fused_moe_gpu.py).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import nanomoe_kernels.fused_moe as fm  # noqa: E402
import nanomoe_kernels.fused_moe_kernel as fmk  # noqa: E402
import nanomoe_kernels.moe_align as ma  # noqa: E402
import nanomoe_kernels.moe_blocks as mb  # noqa: E402
import nanomoe_kernels.moe_sum as ms  # noqa: E402
import nanomoe_kernels.moe_swap_blocks as msb  # noqa: E402
import nanomoe_reference as reference  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from nanomoe_kernels import deepgemm  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not fmk.runs_interpreted():
    # another test module imported kernels/ before the variable was set: decorate the kernels again
    for mod in (ma, mb, ms, msb, fmk, fm):
        importlib.reload(mod)

# these are the interpreter's float32/float16 checks; on a GPU machine (no TRITON_INTERPRET) the kernels
# compile for the GPU, where float32 dots run as TF32: tests/gpu/test_fused_moe_gpu.py checks them there
pytestmark = pytest.mark.skipif(not fmk.runs_interpreted(),
                                reason="CPU kernel tests run under TRITON_INTERPRET=1 (GPU: tests/gpu/)")
DEV = "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3}
CONFIGS = [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2),
           dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=2),
           dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2, USE_TMA=True),
           # 64-row main blocks plus 16-row tail blocks (kernels.moe_blocks)
           dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_M=16),
           {"up": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_M=16,
                       USE_TMA=True),
            "down": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2),
            "linear": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2,
                           SPLIT_M=16)},
           {"up": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2),
            "down": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2),
            "linear": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2)},
           # main and tail blocks in one launch; the down GEMM's A rows through TMA
           dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_M=16,
                MERGE_TAIL=True, USE_TMA=True, A_TMA=True),
           {"up": dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2, SPLIT_M=16,
                       MERGE_TAIL=True),
            "down": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2, A_TMA=True,
                         MERGE_TAIL=True),
            "linear": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_M=16,
                           MERGE_TAIL=True)},
           # merged tails with program groups of at most 2 blocks of one expert (experts split), and groups off
           {"up": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2, SPLIT_M=16,
                       MERGE_TAIL=True, EXPERT_GROUPS=2),
            "down": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_M=16,
                         MERGE_TAIL=True, EXPERT_GROUPS=False),
            "linear": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_M=16,
                           MERGE_TAIL=True, EXPERT_GROUPS=1)},
           # merged tails whose programs cover two column tiles (PAIR_TAILS): weights by TMA and by pointer, with
           # program groups on and off
           {"up": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=4, num_stages=2, SPLIT_M=16,
                       MERGE_TAIL=True, PAIR_TAILS=True, USE_TMA=True),
            "down": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_M=16,
                         MERGE_TAIL=True, PAIR_TAILS=True, EXPERT_GROUPS=False),
            "linear": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2, SPLIT_M=16,
                           MERGE_TAIL=True, PAIR_TAILS=True)},
           # the up GEMM on rows permuted into aligned order, A through TMA (PERMUTE_A)
           {"up": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_M=16,
                       USE_TMA=True, MERGE_TAIL=True, PERMUTE_A=True),
            "down": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, num_warps=4, num_stages=2, A_TMA=True),
            "linear": dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=8, num_warps=4, num_stages=2, SPLIT_M=16,
                           MERGE_TAIL=True)}]


def make_experts(E, H, I, expert_type, dtype, g):
    if expert_type == "linear":
        return (torch.randn(E, H, H, generator=g) * H ** -0.5).to(DEV, dtype),
    return ((torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(DEV, dtype),
            (torch.randn(E, H, I, generator=g) * I ** -0.5).to(DEV, dtype))


def assert_close(out, ref, dtype, what="output"):
    assert torch.isfinite(out).all(), f"{what} has NaN/Inf"
    assert tuple(out.shape) == tuple(ref.shape), f"{what} shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if ref.numel():
        err = float((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-12))
        assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]} ({dtype})"


@st.composite
def problems(draw):
    """(T, k, E, H, I, expert_type, dtype, ids [T, k], routing pattern)."""
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.integers(0, 40))
    H = draw(st.sampled_from([16, 24, 40, 64]))
    I = draw(st.sampled_from([16, 24, 48]))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    pattern = draw(st.sampled_from(["uniform", "one_expert", "skewed"]))
    if pattern == "uniform" or T == 0:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.int64)
    elif pattern == "one_expert":  # every token's first choice is expert 0 (k distinct per token)
        ids = torch.stack([torch.cat([torch.tensor([0]), 1 + torch.randperm(E - 1, generator=g)[:k - 1]])
                           for _ in range(T)])
    else:  # experts above E // 2 never chosen when k allows: empty experts
        lo = max(k, (E + 1) // 2)
        ids = torch.stack([torch.randperm(lo, generator=g)[:k] for _ in range(T)])
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    return T, k, E, H, I, draw(st.sampled_from(["swiglu", "linear"])), \
        draw(st.sampled_from([torch.float32, torch.float16])), ids, g


@settings(max_examples=25)
@given(problems(), st.sampled_from(range(len(CONFIGS))))
def test_fused_moe_matches_reference(prob, ci):
    T, k, E, H, I, expert_type, dtype, ids, g = prob
    w = make_experts(E, H, I, expert_type, dtype, g)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    tw = torch.rand(T, k, generator=g) + 0.1
    out = fm.fused_moe(x, ids.to(DEV), tw.to(DEV), w, expert_type, config=CONFIGS[ci])
    assert out.dtype == dtype
    assert_close(out, reference.moe_experts(x, ids, tw, w, expert_type), dtype)


@settings(max_examples=8)
@given(problems(), st.sampled_from([False, True]))
def test_paired_tails_same_bits_as_single_tails(prob, tma):
    """PAIR_TAILS changes which program computes a tail tile, not its arithmetic: the same bits as one column
    tile per tail program, and the oracle's values (odd column-tile counts included: H 24/40, I 24/48)."""
    T, k, E, H, I, expert_type, dtype, ids, g = prob
    w = make_experts(E, H, I, expert_type, dtype, g)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    tw = torch.rand(T, k, generator=g) + 0.1
    base = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2, SPLIT_M=16,
                MERGE_TAIL=True, USE_TMA=tma)
    single = fm.fused_moe(x, ids.to(DEV), tw.to(DEV), w, expert_type, config=base)
    paired = fm.fused_moe(x, ids.to(DEV), tw.to(DEV), w, expert_type, config={**base, "PAIR_TAILS": True})
    assert torch.equal(paired, single)
    assert_close(paired, reference.moe_experts(x, ids, tw, w, expert_type), dtype)


def expert_rows(x, counts, w, expert_type):
    """reference per row: row i of expert e -> expert_e(x[i]) (float64 [rows, H_out])."""
    rows_e = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return reference.moe_experts(x, rows_e[:, None], torch.ones(len(rows_e), 1), w, expert_type)


@settings(max_examples=20)
@given(st.lists(st.integers(0, 37), min_size=1, max_size=5), st.integers(0, 3),
       st.sampled_from(["swiglu", "linear"]), st.sampled_from([torch.float32, torch.float16]),
       st.sampled_from(range(len(CONFIGS))), st.integers(0, 2 ** 16))
def test_contiguous_matches_reference(counts, extra, expert_type, dtype, ci, seed):
    g = torch.Generator().manual_seed(seed)
    E, H, I, n = len(counts), 24, 16, sum(counts)
    w = make_experts(E, H, I, expert_type, dtype, g)
    x = torch.randn(n + extra, H, generator=g).to(DEV, dtype)  # `extra` rows past sum(counts): unowned
    out = fm.fused_moe_contiguous(x, torch.tensor(counts, device=DEV), w, expert_type, config=CONFIGS[ci])
    assert out.shape == (n + extra, H)
    assert_close(out[:n], expert_rows(x[:n], counts, w, expert_type), dtype)


@settings(max_examples=20)
@given(st.lists(st.integers(0, 37), min_size=1, max_size=5), st.integers(0, 3), st.integers(1, 40),
       st.sampled_from(["swiglu", "linear"]), st.sampled_from([torch.float32, torch.float16]),
       st.sampled_from([torch.int32, torch.int64]), st.sampled_from(range(len(CONFIGS))), st.integers(0, 2 ** 16))
def test_gathered_matches_contiguous(counts, extra, R, expert_type, dtype, index_dtype, ci, seed):
    """rows [R, H] read through index [n + extra] (repeats, unread rows) == contiguous on rows[index]."""
    g = torch.Generator().manual_seed(seed)
    E, H, I, n = len(counts), 24, 16, sum(counts)
    w = make_experts(E, H, I, expert_type, dtype, g)
    rows = torch.randn(R, H, generator=g).to(DEV, dtype)
    index = torch.randint(0, R, (n + extra,), generator=g).to(DEV, index_dtype)
    cnt = torch.tensor(counts, device=DEV)
    out = fm.fused_moe_gathered(rows, index, cnt, w, expert_type, config=CONFIGS[ci], validate=True)
    assert out.shape == (n + extra, H)
    want = fm.fused_moe_contiguous(rows[index.long()], cnt, w, expert_type, config=CONFIGS[ci])
    assert torch.equal(out[:n], want[:n])  # the same tiles on the same values
    assert_close(out[:n], expert_rows(rows[index[:n].long()], counts, w, expert_type), dtype)
    if n + extra:
        with pytest.raises(ValueError, match=r"index must lie in \[0, "):
            fm.fused_moe_gathered(rows, index - R, cnt, w, expert_type, config=CONFIGS[ci], validate=True)


@settings(max_examples=20)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=5), st.integers(0, 12),
       st.sampled_from(["swiglu", "linear"]), st.sampled_from([torch.float32, torch.float16]),
       st.sampled_from(range(len(CONFIGS))), st.integers(0, 2 ** 16))
def test_masked_matches_reference(counts, slack, expert_type, dtype, ci, seed):
    g = torch.Generator().manual_seed(seed)
    E, H, I, cap = len(counts), 40, 24, max(counts) + slack
    w = make_experts(E, H, I, expert_type, dtype, g)
    x = torch.randn(E, cap, H, generator=g).to(DEV, dtype)
    out = fm.fused_moe_masked(x, torch.tensor(counts, device=DEV), w, expert_type, config=CONFIGS[ci])
    assert out.shape == (E, cap, H)
    got = torch.cat([out[e, :c] for e, c in enumerate(counts)])
    rows = torch.cat([x[e, :c] for e, c in enumerate(counts)])
    assert_close(got, expert_rows(rows, counts, w, expert_type), dtype)


@settings(max_examples=25)
@given(problems(), st.sampled_from([16, 32, 64]))
def test_align_groups_rows_by_expert(prob, block_m):
    T, k, E, *_, ids, _ = prob
    check_alignment(ids, E, block_m)


@pytest.mark.parametrize("n, E, block_m, chunks", [(20000, 64, 16, (1024, 128)), (33000, 256, 16, (1024,)),
                                                    (9000, 8, 64, (1024, 128))])
def test_align_over_many_programs(n, E, block_m, chunks):
    # the offsets kernel's grid: 21 / 128 programs (the second wraps: 2115 blocks over 128 programs of 16)
    # and 3 programs of 64 blocks at 8 experts; skewed counts, a few experts with none
    g = torch.Generator().manual_seed(n)
    ids = (torch.rand(n, generator=g) ** 3 * (E - 3)).to(torch.int32)
    al = check_alignment(ids, E, block_m)
    # other chunkings (1024: 9-33 chunks; 128: the sub-chunk is the whole chunk) give the same alignment
    for chunk in chunks:
        other = ma.moe_align(ids, E, block_m, chunk=chunk)
        used = int(al.num_padded[0])
        assert int(other.num_padded[0]) == used
        assert torch.equal(other.sorted_ids[:used], al.sorted_ids[:used])
        assert torch.equal(other.expert_ids[:used // block_m], al.expert_ids[:used // block_m])
    with pytest.raises(ValueError, match="chunk must be a power of two >= 16"):
        ma.moe_align(ids, E, block_m, chunk=100)


def test_default_chunk_rows():
    # one chunk up to 128 rows, then chunks of 128-1024 rows (~128 of them past 16k rows)
    assert [ma.chunk_rows(m) for m in (5, 128, 1000, 16384, 16385, 33000, 10 ** 6)] == [16, 128, 128, 128, 256, 512,
                                                                                          1024]


def check_alignment(ids: torch.Tensor, E: int, block_m: int) -> ma.Alignment:
    """moe_align(ids) against the rows' expert ids: full blocks of one expert, every row once, stable order."""
    al = ma.moe_align(ids.to(DEV), E, block_m)
    flat = ids.reshape(-1).tolist()
    npad = int(al.num_padded[0])
    counts = [flat.count(e) for e in range(E)]
    assert npad == sum(-(-c // block_m) * block_m for c in counts) <= al.sorted_ids.numel()
    sids, eids = al.sorted_ids[:npad].tolist(), al.expert_ids[: npad // block_m].tolist()
    seen = []
    for b, e in enumerate(eids):
        block = [r for r in sids[b * block_m:(b + 1) * block_m] if r != len(flat)]
        assert block and all(flat[r] == e for r in block), "a block mixes experts or is all padding"
        seen += block
    assert sorted(seen) == list(range(len(flat)))  # every row exactly once
    assert all(sorted(r for r in seen if flat[r] == e) == [r for r in seen if flat[r] == e] for e in range(E))
    assert_padding_last(al, len(flat))
    return al


def assert_padding_last(al: ma.Alignment, sentinel: int) -> None:
    """Each expert's padded segment lists its real rows first, then padding: the wgmma kernel's carried tails
    (kernels/fused_moe_wgmma_tail.py) count a tail's rows by where its padding starts."""
    start = 0
    for p in al.padded_counts.tolist():
        seg = al.sorted_ids[start:start + p].tolist()
        real = sum(r != sentinel for r in seg)
        assert all(r != sentinel for r in seg[:real]) and all(r == sentinel for r in seg[real:]), seg
        start += p


@settings(max_examples=15)
@given(st.lists(st.integers(0, 70), min_size=1, max_size=6), st.sampled_from([16, 64]), st.integers(0, 9))
def test_contiguous_and_masked_alignments_put_padding_last(counts, block_m, slack):
    c = torch.tensor(counts, dtype=torch.int32, device=DEV)
    assert_padding_last(ma.moe_align_contiguous(c, sum(counts), block_m), sum(counts))
    cap = max(counts) + slack
    assert_padding_last(ma.moe_align_masked(c, cap, block_m), len(counts) * cap)


@settings(max_examples=20)
@given(problems(), st.sampled_from([(16, 32), (16, 64), (32, 128), (64, 128)]))
def test_block_tables_cover_each_segment(prob, sizes):
    T, k, E, *_, ids, _ = prob
    tm, bm = sizes
    al = ma.moe_align(ids.to(DEV), E, tm)
    bt = mb.block_tables(al, bm)
    pc = al.padded_counts.tolist()
    seg = [sum(pc[:e]) for e in range(E)]
    want_main = [(seg[e] + j * bm, e) for e in range(E) for j in range(pc[e] // bm)]
    want_tail = [(seg[e] + pc[e] // bm * bm + j * tm, e) for e in range(E) for j in range(pc[e] % bm // tm)]
    n_main, n_tail = bt.counts.tolist()
    assert list(zip(bt.main_rows[:n_main].tolist(), bt.main_experts[:n_main].tolist())) == want_main
    assert list(zip(bt.tail_rows[:n_tail].tolist(), bt.tail_experts[:n_tail].tolist())) == want_tail
    assert n_main <= bt.main_rows.numel() and n_tail <= bt.tail_rows.numel()
    # the merged list: each expert's main blocks then its tail blocks, tails flagged by 2^30
    want_merged = [item for e in range(E) for item in
                   [(r, e) for r, ee in want_main if ee == e] + [(r, e | 1 << 30) for r, ee in want_tail if ee == e]]
    got = list(zip(bt.merged_rows[:n_main + n_tail].tolist(), bt.merged_codes[:n_main + n_tail].tolist()))
    assert got == want_merged
    n_all = [pc[e] // bm + pc[e] % bm // tm for e in range(E)]
    assert bt.expert_blocks.tolist() == n_all
    assert bt.expert_first.tolist() == [sum(n_all[:e]) for e in range(E)]
    # carried-tail flags (kernels/fused_moe_wgmma_tail.py): TN = 32 in bits 0-1, 16 in bits 2-3
    real = [ids.reshape(-1).tolist().count(e) for e in range(E)]
    want_flags = []
    for e in range(E):
        nm, nt = pc[e] // bm, pc[e] % bm // tm
        rest = real[e] - nm * bm   # the real rows past the main blocks, all in the first tail block
        for j in range(nm + nt):
            bit = 0
            if nm and nt and j in (nm - 1, nm):
                bit = sum((2 if j == nm else 1) << s for s, n in ((0, 32), (2, 16)) if n < tm and rest <= n)
            want_flags.append(bit)
    assert bt.merged_tails[:n_main + n_tail].tolist() == want_flags


def test_carried_tail_flags_at_the_edges():
    """The flags at counts around TN: carried for a tail of 1..TN rows after a main block, never for TN + 1 rows,
    a lone tail (no main block), an exact main block or an empty expert."""
    counts = [129, 160, 161, 3, 128, 0, 67, 296, 130, 144, 145]
    al = ma.moe_align_contiguous(torch.tensor(counts, dtype=torch.int32, device=DEV), sum(counts), 64)
    bt = mb.block_tables(al, 128)
    used = int(bt.counts.sum())
    codes, flags = bt.merged_codes[:used].tolist(), bt.merged_tails[:used].tolist()
    carry = {(c & 0x3FFFFFFF, c >= 1 << 30): f for c, f in zip(codes, flags) if f}
    # expert: flags of (its last main block, its tail block); 32 in bits 0-1, 16 in bits 2-3
    want = {0: (5, 10), 1: (1, 2), 8: (5, 10), 9: (5, 10), 10: (1, 2)}
    assert carry == {(e, t): f[t] for e, f in want.items() for t in (False, True)}


@triton.jit
def _group_map_kernel(codes_ptr, first_ptr, nblocks_ptr, out_ptr, num_pid_n, G: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = mb.expert_group(pid, num_pid_n, codes_ptr, first_ptr, nblocks_ptr, G)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@settings(max_examples=15)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=6), st.integers(1, 4), st.integers(1, 4))
def test_expert_groups_cover_each_tile_once_within_one_expert(blocks, num_pid_n, G):
    # expert e has blocks[e] merged blocks; programs 0 .. num_pid_n * sum - 1 must hit every (block, column tile)
    # once, each run of consecutive programs over a group must stay inside one expert and hold <= G blocks
    codes = torch.tensor([e | (j % 2) << 30 for e, n in enumerate(blocks) for j in range(n)] or [0], dtype=torch.int32)
    first = torch.tensor([sum(blocks[:e]) for e in range(len(blocks))], dtype=torch.int32)
    nb = torch.tensor(blocks, dtype=torch.int32)
    total = sum(blocks)
    if total == 0:
        return
    out = torch.full((total * num_pid_n, 2), -1, dtype=torch.int32)
    _group_map_kernel[(total * num_pid_n,)](codes, first, nb, out, num_pid_n, G=G)
    pairs = [tuple(p) for p in out.tolist()]
    assert sorted(pairs) == [(m, n) for m in range(total) for n in range(num_pid_n)]
    expert_of = [e for e, n in enumerate(blocks) for _ in range(n)]
    pid = 0
    while pid < len(pairs):  # a group: num_pid_n * size consecutive programs over blocks [g0, g0 + size)
        g0 = min(m for m, _ in pairs[pid:pid + num_pid_n])
        size = next(s for s in range(1, G + 1) if sorted(m for m, _ in pairs[pid:pid + num_pid_n * s]) ==
                    sorted(list(range(g0, g0 + s)) * num_pid_n))
        group = pairs[pid:pid + num_pid_n * size]
        assert len({expert_of[m] for m, _ in group}) == 1, group
        assert [m for m, _ in group[:size]] == list(range(g0, g0 + size)), group  # blocks first, then columns
        pid += num_pid_n * size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_permute_a_configs(dtype):
    """The PERMUTE_A config, and the merged-tail TMA one, on fixed problems (the property tests draw configs at random):
    fused_moe, and the gathered batch (PERMUTE_A then reads through the index), against the float64 reference."""
    g = torch.Generator().manual_seed(5)
    T, k, E, H, I = 37, 3, 5, 40, 24
    w = make_experts(E, H, I, "swiglu", dtype, g)
    x = torch.randn(T, H, generator=g).to(DEV, dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    tw = torch.rand(T, k, generator=g) + 0.1
    for ci in (6, 8):
        out = fm.fused_moe(x, ids.to(DEV), tw.to(DEV), w, "swiglu", config=CONFIGS[ci])
        assert_close(out, reference.moe_experts(x, ids, tw, w, "swiglu"), dtype, f"config {ci}")
    counts = [7, 0, 12, 3, 9]
    index = torch.randint(0, T, (sum(counts),), generator=g)
    got = fm.fused_moe_gathered(x, index.to(DEV), torch.tensor(counts).to(DEV), w, "swiglu", config=CONFIGS[8])
    assert_close(got, expert_rows(x[index], counts, w, "swiglu"), dtype, "gathered, PERMUTE_A")


def test_zero_tokens_and_bad_input():
    g = torch.Generator().manual_seed(0)
    w = make_experts(3, 16, 16, "swiglu", torch.float32, g)
    x = torch.randn(4, 16, generator=g).to(DEV)
    ids, tw = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2]], device=DEV), torch.rand(4, 2, device=DEV)
    cfg = CONFIGS[0]
    assert fm.fused_moe(x[:0], ids[:0], tw[:0], w, config=cfg).shape == (0, 16)
    no_rows = torch.zeros(3, dtype=torch.int64, device=DEV)
    assert fm.fused_moe_contiguous(x[:0], no_rows, w, config=cfg).shape == (0, 16)
    assert fm.fused_moe_gathered(x, ids[:0, 0], no_rows, w, config=cfg).shape == (0, 16)
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        fm.fused_moe_gathered(x, ids[:, 0].float(), torch.tensor([2, 1, 1], device=DEV), w, config=cfg)
    with pytest.raises(ValueError, match="index must have 1 dims"):
        fm.fused_moe_gathered(x, ids, torch.tensor([2, 1, 1], device=DEV), w, config=cfg)
    with pytest.raises(ValueError, match="expert ids outside"):
        fm.fused_moe(x, ids + 1, tw, w, config=cfg, validate=True)
    with pytest.raises(ValueError, match="expert_type"):
        fm.fused_moe(x, ids, tw, w, "gelu", config=cfg)
    with pytest.raises(ValueError, match="w13 must be"):
        fm.fused_moe(x, ids, tw, (w[0], w[1][:, :8].contiguous()), config=cfg)
    with pytest.raises(TypeError, match="w13 must match x"):
        fm.fused_moe(x.half(), ids, tw, w, config=cfg)
    with pytest.raises(TypeError, match="x must be one of"):
        fm.fused_moe(x.long(), ids, tw, w, config=cfg)
    with pytest.raises(ValueError, match="topk_weights"):
        fm.fused_moe(x, ids, tw[:, :1], w, config=cfg)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        fm.fused_moe(x, ids.float(), tw, w, config=cfg)
    with pytest.raises(ValueError, match="top-k"):
        fm.fused_moe(x, torch.zeros(4, 4, dtype=torch.int64, device=DEV), torch.rand(4, 4, device=DEV), w,
                     config=cfg)
    with pytest.raises(ValueError, match="counts must"):
        fm.fused_moe_contiguous(x, torch.tensor([3, 3, 3], device=DEV), w, config=cfg, validate=True)
    with pytest.raises(ValueError, match="counts must lie"):
        fm.fused_moe_masked(x.view(1, 4, 16).expand(3, 4, 16), torch.tensor([5, 0, 0], device=DEV), w,
                            config=cfg, validate=True)
    with pytest.raises(ValueError, match="power of two"):
        fm.fused_moe(x, ids, tw, w, config={**cfg, "BLOCK_N": 24})
    with pytest.raises(ValueError, match="missing"):
        fm.fused_moe(x, ids, tw, w, config={"BLOCK_M": 16})
    with pytest.raises(ValueError, match=r"unknown keys \['WGMA'\]"):   # a misspelt key is refused by name
        fm.fused_moe(x, ids, tw, w, config={**cfg, "WGMA": True})


def test_tuned_tables_load_and_default_warns(tmp_path, monkeypatch):
    shipped = sorted(p.name for p in fm.TUNED_DIR.glob("*.json"))
    assert shipped and sorted(fm.TABLES) == shipped  # loaded at import, every entry a checked config
    assert all(table for table in fm.TABLES.values())
    name = fm.config_name("up", 4, 32, 16, torch.float32, "cpu")
    (tmp_path / name).write_text(json.dumps({"_meta": {}, "64": CONFIGS[0], "4096": CONFIGS[1]}))
    monkeypatch.setattr(fm, "TABLES", fm.load_tables(tmp_path))  # E=4 "up" only
    assert fm.get_config("up", 4, 32, 16, torch.float32, 100, torch.device("cpu"))["BLOCK_M"] == 16
    assert fm.get_config("up", 4, 32, 16, torch.float32, 3000, torch.device("cpu"))["BLOCK_M"] == 32
    fm._warn_default.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            fm.get_config("down", 4, 16, 32, torch.float32, 100, torch.device("cpu"))
    assert len([w for w in caught if "no tuned config" in str(w.message)]) == 1
    # no table for 16 experts: E=4's table at the same rows per expert (M * 4 / 16), no warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fm.get_config("up", 16, 32, 16, torch.float32, 1600, torch.device("cpu"))["BLOCK_M"] == 16  # as M=400
        assert fm.get_config("up", 16, 32, 16, torch.float32, 12000, torch.device("cpu"))["BLOCK_M"] == 32
    assert not [w for w in caught if "no tuned config" in str(w.message)]
    # a table for 16 experts tuned at one large size only: its own entry there, E=4's nearer one at 100 rows
    (tmp_path / fm.config_name("up", 16, 32, 16, torch.float32, "cpu")).write_text(
        json.dumps({"_meta": {}, "65536": CONFIGS[3]}))
    monkeypatch.setattr(fm, "TABLES", fm.load_tables(tmp_path))
    assert fm.get_config("up", 16, 32, 16, torch.float32, 60000, torch.device("cpu")) == fm.check_config(CONFIGS[3])
    assert fm.get_config("up", 16, 32, 16, torch.float32, 1600, torch.device("cpu"))["BLOCK_M"] == 16


def test_stage_c_needs_wgmma():
    """STAGE_C only changes the wgmma kernel's epilogue: without WGMMA it is refused, with it kept (default off)."""
    base = {**CONFIGS[3], "WGMMA": True}
    assert fm.check_config(base)["STAGE_C"] is False
    assert fm.check_config({**base, "STAGE_C": 1})["STAGE_C"] is True
    with pytest.raises(ValueError, match="STAGE_C.*needs WGMMA"):
        fm.check_config({**CONFIGS[3], "STAGE_C": True})
    staged = [c for t in fm.TABLES.values() for c in t.values() if c.get("STAGE_C")]
    assert staged and all(c["WGMMA"] for c in staged)   # the H200 tables use it, always with WGMMA


def test_tail_n_needs_wgmma_and_fits():
    """TAIL_N (carried tails) is 0, 16 or 32 and needs WGMMA; the wgmma kernel's shared-memory budget refuses the
    combinations that do not fit (a 32-row tail ring with the staged epilogue at 4 stages) and takes the rest."""
    base = {**CONFIGS[3], "WGMMA": True}
    assert fmk.check_config(base)["TAIL_N"] == 0
    assert fmk.check_config({**base, "TAIL_N": 32})["TAIL_N"] == 32
    for bad in ({**base, "TAIL_N": 8}, {**base, "TAIL_N": True}, {**CONFIGS[3], "TAIL_N": 16}):
        with pytest.raises(ValueError, match="TAIL_N"):
            fmk.check_config(bad)
    from nanomoe_kernels.fused_moe_wgmma import SMEM_BYTES, smem_bytes

    assert smem_bytes(128, True, 0, 4, True) == 229376 <= SMEM_BYTES   # the tables' staged up entries
    assert smem_bytes(128, True, 32, 4, False) <= SMEM_BYTES < smem_bytes(128, True, 32, 4, True)
    assert smem_bytes(256, False, 32, 3, True) <= SMEM_BYTES < smem_bytes(256, False, 32, 4, True)


def test_deepgemm_says_why_not():
    if torch.cuda.is_available():
        pytest.skip("the GPU tests cover DeepGEMM")
    ok, why = deepgemm.supports()
    assert not ok and "CUDA" in why
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = (torch.zeros(2, 128, 64, dtype=torch.bfloat16), torch.zeros(2, 64, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="deepgemm backend cannot run"):
        deepgemm.deepgemm_moe_contiguous(x, torch.tensor([2, 2]), w)


@pytest.mark.parametrize("counts, layout, flop, bound, row_bytes, want", [
    ((256, 250, 270, 260), "auto", 1e10, None, 0, ("masked", 384)),  # spare rows worth 2.5e12 FLOP, no bound
    ((256, 250, 270, 260), "auto", 1e10, 300, 1, ("bounded", 384)),  # a bound: no host read
    ((256, 250, 270, 260), "auto", 1e10, 300, 1 << 30, ("masked", 384)),  # one expert's buffers past the max
    ((256, 250, 270, 260), "auto", 1e10, 300, 1 << 23, ("masked", 384)),  # 3 GiB an expert: 4 groups, too many
    ((256, 250, 270, 260), "auto", 1e10, 300, 1 << 22, ("bounded", 384)),  # 1.5 GiB an expert: 2 groups
    ((256, 250, 270, 260), "auto", 4e8, 300, 1, ("bounded", 384)),  # 1e11 FLOP: worth the capacity kernel
    ((256, 250, 270, 260), "auto", 4e8, None, 1, ("contiguous", 0)),  # ... not a host read
    ((256, 250, 270, 260), "auto", 1e8, 300, 1, ("contiguous", 0)),  # 2.5e10 FLOP: worth neither
    ((256, 250, 270, 260), "contiguous", 1e10, 300, 1, ("contiguous", 0)),
    ((256, 250, 270, 260), "bounded", 0.0, 10 ** 6, 0, ("bounded", 1152)),  # bound past N rows: N rounded up
    ((20, 30, 10, 4), "auto", 1e10, 64, 1, ("masked", 128)),  # 16 rows per expert: a host read, not bounded
    ((10, 15, 5, 2), "auto", 1e10, 64, 1, ("contiguous", 0)),  # 8 rows per expert: below MASKED_ROWS_PER_EXPERT
    ((40, 60, 20, 8), "auto", 1e10, 64, 1, ("bounded", 128)),  # 32 rows per expert: BOUNDED_ROWS_PER_EXPERT
    ((20, 30, 10, 4), "masked", 0.0, None, 0, ("masked", 128)),
    ((1000, 10, 10, 10), "auto", 1e10, None, 0, ("contiguous", 0)),  # skewed: 4 x 1024 rows > 2x the contiguous
    ((1000, 10, 10, 10), "masked", 0.0, None, 0, ("masked", 1024)),
    ((0, 0, 0, 0), "masked", 0.0, None, 0, ("masked", 0)),
])
def test_deepgemm_pick_layout(counts, layout, flop, bound, row_bytes, want):
    """The layout rule on a hand-made alignment (padded counts to 128 rows, DeepGEMM's alignment)."""
    from nanomoe_kernels.deepgemm_layout import pick_layout
    from nanomoe_kernels.moe_align import Alignment

    c = torch.tensor(counts)
    padded = (c + 127) // 128 * 128
    al = Alignment(torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int32),
                   padded.sum().reshape(1).int(), 128, int(c.sum()), padded.int())
    assert pick_layout(al, 4, layout, 128, flop_per_row=flop, bound_rows=bound, bytes_per_row=row_bytes) == want
    with pytest.raises(ValueError, match="layout must be one of"):
        pick_layout(al, 4, "padded", 128)
    with pytest.raises(ValueError, match="needs bound_rows"):
        pick_layout(al, 4, "bounded", 128)


@pytest.mark.parametrize("E, cap, row_bytes, want", [
    (4, 384, 1, 4), (4, 384, 1 << 22, 2), (5, 384, 1 << 22, 2), (4, 384, 1 << 23, 1), (4, 384, 1 << 30, 1),
    (0, 384, 1, 1), (256, 1024, 26624, 128)])  # the last: DeepSeek-V3 dims, 256 experts x 1024 tokens (7 GB)
def test_deepgemm_experts_per_group(E, cap, row_bytes, want):
    """The bounded layout's groups of experts: all when their buffers fit BOUNDED_MAX_BYTES (4 GiB), else as many
    as fit, in near-equal groups; never fewer than one expert."""
    from nanomoe_kernels.deepgemm_layout import BOUNDED_MAX_BYTES, experts_per_group

    got = experts_per_group(E, cap, row_bytes)
    assert got == want
    assert got == max(E, 1) or got * cap * row_bytes <= BOUNDED_MAX_BYTES or got == 1


def test_deepgemm_backend_names_the_unsupported_shape():
    from nanomoe_fn import MoEConfig
    from nanomoe_fn.moe.expert_kernels import deepgemm_supports

    cuda = torch.device("cuda")
    ok, why = deepgemm_supports(MoEConfig(hidden=96, intermediate=128, num_experts=4, top_k=2), cuda)
    assert not ok and "hidden (96)" in why and "multiples of 64" in why
    ok, why = deepgemm_supports(MoEConfig(hidden=64, intermediate=64, num_experts=4, top_k=2,
                                          expert_type="linear"), cuda)
    assert not ok and "SwiGLU" in why
