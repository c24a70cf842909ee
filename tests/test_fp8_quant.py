"""Block-scaled FP8 quantisation (kernels/fp8_quant.py) against the float64 oracle (reference/fp8.py), bit for
bit: the Triton group kernel == its torch twin == the reference (q bytes and scales), torch's own cast for the
rounding itself, the col_tma scale layout, weight blocks with partial last blocks, and the round-trip bound.

Dimension legend: M rows, K columns, g the group width, G = ceil(K / g); weights [E, N, K] with b0 x b1 blocks.
On the CPU the kernel runs under TRITON_INTERPRET=1 (float32/float16; the interpreter gets bfloat16 wrong);
on a GPU machine the same tests run it compiled, bfloat16 included.

Round-trip bound, per element, with u = 2^-24 (float32's unit roundoff) and s the element's scale: the kernel
computes c = clamp(fl(x / s)) with |c - x/s| <= 2u |x/s| (the division's rounding, or the clamp, which only
cuts what that rounding added since s >= amax/448 (1 - u)), then q = e4m3(c) with |q - c| <= |c| 2^-4 for
|c| >= 2^-6 (half a spacing 2^(floor(log2 |c|) - 3)) and <= 2^-10 below, and dequantises fl(q s). Summed:
    |x - fl(q s)| <= |x| (2^-4 + 2^-22) + s 2^-10 (1 + 2^-23).
"""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nanomoe_kernels.fp8_quant as fq  # noqa: E402
import nanomoe_reference.fp8 as ref  # noqa: E402
import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and not fq.runs_interpreted():
    fq = importlib.reload(fq)  # kernels/ was imported before the variable was set: decorate the kernel again

DEV = "cpu" if fq.runs_interpreted() or not torch.cuda.is_available() else "cuda"
TRITON = fq.runs_interpreted() or DEV == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])
F8 = torch.float8_e4m3fn
needs_triton = pytest.mark.skipif(not TRITON, reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1")


def e4m3_grid() -> torch.Tensor:
    """Every finite non-negative e4m3fn value, ascending (float64)."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(F8).double()  # 0x7F is NaN
    return vals.sort().values


def tricky_values() -> torch.Tensor:
    """Positive float32 values in [0, 448]: the grid, every tie between neighbours, and each tie's float32
    neighbours (so rounding up across a power of two, 7.75 -> 8, is in)."""
    g = e4m3_grid()
    mids = ((g[1:] + g[:-1]) / 2).float()
    up, down = torch.nextafter(mids, torch.tensor(1e9)), torch.nextafter(mids, torch.tensor(0.0))
    return torch.cat([g.float(), mids, up, down]).clamp(max=448.0)


def as_bytes(q: torch.Tensor) -> torch.Tensor:
    """fp8 tensor -> its uint8 bytes; a float64 reference on the grid converts exactly."""
    return (q if q.dtype == F8 else q.to(F8)).view(torch.uint8).cpu()


def test_round_e4m3_is_torchs_cast():
    """The reference rounding == torch's cast on ties, near-ties, both signs, zeros, subnormals, saturation."""
    v = tricky_values()
    v = torch.cat([v, -v, torch.tensor([0.0, -0.0, 448.0, 463.9, 464.0, 1e4, 2.0**-10, 3 * 2.0**-10, 1e-30])])
    v = torch.cat([v, -v[-6:]])
    # far past the range torch's casts differ by version (2.11 gives NaN for 1e4, 2.13 saturates to 448):
    # compare where both agree, and saturate in the reference (the kernels clamp before they cast)
    near = v.abs() < 1e3
    assert torch.equal(as_bytes(ref.round_e4m3(v[near].double())), as_bytes(v[near].to(F8)))
    far = ref.round_e4m3(v[~near].double())
    assert far.numel() and torch.equal(far, 448.0 * v[~near].double().sign())
    assert ref.round_e4m3(torch.tensor([-0.0], dtype=torch.float64)).signbit().item()


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, -14, 5])
def test_kernel_rounds_ties_and_saturation_edge(dtype, k):
    """Rows [+-448, 127 values | +-448, 59 values] * 2^k: every group's amax is 448 * 2^k (the last one
    partial), so its scale is exactly 2^k and x / s is exact: the kernel's bytes == torch's cast of x / s,
    ties to even and rounding up across a power of two included."""
    g = e4m3_grid()
    v = tricky_values() if dtype == torch.float32 else torch.cat([g, (g[1:] + g[:-1]) / 2]).float()
    v = torch.cat([v, -v])
    v = v[torch.randperm(v.numel(), generator=torch.Generator().manual_seed(0))]
    M = -(-v.numel() // 186)
    x = torch.zeros(M, 188)
    x[:, [0, 128]] = torch.tensor([448.0, -448.0])
    keep = torch.ones(188, dtype=torch.bool)
    keep[[0, 128]] = False
    x[:, keep] = torch.cat([v, torch.zeros(M * 186 - v.numel())]).view(M, 186)
    x = (x * 2.0**k).to(dtype)
    q, s = fq.quant_fp8_groups(x.to(DEV))
    want_q, want_s = fq.quant_fp8_groups_torch(x.to(DEV))
    assert torch.equal(as_bytes(q), as_bytes(want_q)) and torch.equal(s, want_s)
    assert (s.cpu() == 2.0**k).all()
    assert torch.equal(as_bytes(q), as_bytes((x.float() / 2.0**k).to(F8)))


@needs_triton
def test_kernel_divides_exactly():
    """Scales s with 19 significant bits and values t * s for ties t (exact in float32): x / s is exactly the
    tie, rounded to even. A multiplication by 1/s (or a GPU's approximate float32 '/') lands off the tie now
    and then: those bytes differ."""
    gen = torch.Generator().manual_seed(2)
    g = e4m3_grid()
    ties = ((g[1:] + g[:-1]) / 2).float()
    M = 64
    s = torch.randint(2**18, 2**19, (M, 1), generator=gen) * 2.0 ** torch.randint(-21, -15, (M, 1), generator=gen)
    t = ties[torch.randint(0, len(ties), (M, 254), generator=gen)] * (torch.rand(M, 254, generator=gen) - 0.5).sign()
    col = torch.full((M, 1), 448.0)
    x = torch.cat([col, t[:, :127], -col, t[:, 127:]], 1) * s  # every product fits float32's 24 bits
    q, sc = fq.quant_fp8_groups(x.to(DEV))
    assert torch.equal(sc.cpu(), s.expand(M, 2))
    assert torch.equal(as_bytes(q), as_bytes(ref.round_e4m3(x.double() / s.double())))


@st.composite
def activations(draw: st.DrawFn, dtypes=tuple(DTYPES)) -> torch.Tensor:
    """x [M, K]: M 0-40, K 1-300 (partial last groups), rows of mixed magnitudes, some all zero, some at
    ties (a 448 * 2^j amax with tie values), some where one element saturates the group."""
    dtype = draw(st.sampled_from(dtypes))
    M, K = draw(st.integers(0, 40)), draw(st.integers(1, 300))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lo = -6 if dtype == torch.float32 else -2
    x = torch.randn(M, K, generator=gen) * 10.0 ** torch.empty(M, 1).uniform_(lo, 3, generator=gen)
    kinds = torch.randint(0, 5, (M,), generator=gen)
    ties = torch.tensor([2.0**-10, 3 * 2.0**-10, 1.0625, 7.75, 13.0, 26.0, 232.0, 440.0])
    for r in range(M):
        if kinds[r] == 0:
            x[r] = 0.0
        elif kinds[r] == 1:
            x[r] = ties[torch.randint(0, len(ties), (K,), generator=gen)] * torch.randn(K, generator=gen).sign()
            x[r, ::128] = 448.0
            x[r] *= 2.0 ** int(torch.randint(-3, 4, (1,), generator=gen))
        elif kinds[r] == 2:
            x[r, torch.randint(0, K, (1,), generator=gen)] *= 1e3
    big = torch.finfo(dtype).max / 2  # finite inputs only (the scheme's domain)
    return x.clamp(-big, big).to(dtype)


@needs_triton
@settings(max_examples=40)
@given(activations(), st.sampled_from(["row", "col_tma"]))
def test_group_quant_triton_torch_reference_agree(x, layout):
    q, s = fq.quant_fp8_groups(x.to(DEV), scale_layout=layout)
    q2, s2 = fq.quant_fp8_groups_torch(x.to(DEV), scale_layout=layout)
    qr, sr = ref.quant_groups_ref(x)
    M, K = x.shape
    assert q.shape == (M, K) and q.dtype == F8 and s.shape == (M, -(-K // 128)) and s.dtype == torch.float32
    assert torch.equal(as_bytes(q), as_bytes(q2)) and torch.equal(as_bytes(q), as_bytes(qr))
    assert torch.equal(s, s2) and torch.equal(s.cpu().double(), sr)
    assert s.stride() == s2.stride()


@settings(max_examples=40)
@given(activations(dtypes=(torch.float32, torch.float16, torch.bfloat16)))
def test_group_round_trip_within_bound(x):
    """dequant(quant(x)) within the bound derived in the module docstring, per element (torch twin: any
    dtype on the CPU; the kernel equals it bit for bit above)."""
    q, s = fq.quant_fp8_groups_torch(x)
    deq = fq.dequant_fp8_blocks(q, s, (1, 128))
    assert torch.equal(deq.double(), ref.dequant_groups_ref(q.double(), s).float().double())
    xd, sd = x.double(), s.double().repeat_interleave(128, 1)[:, : x.shape[1]]
    bound = xd.abs() * (2.0**-4 + 2.0**-22) + sd * 2.0**-10 * (1 + 2.0**-23)
    assert ((xd - deq.double()).abs() <= bound).all()


def test_round_trip_bound_is_nearly_attained():
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    q, s = fq.quant_fp8_groups_torch(x)
    err = (x.double() - fq.dequant_fp8_blocks(q, s, (1, 128)).double()).abs()
    assert float((err / (x.double().abs() * 2.0**-4)).max()) > 0.9


@needs_triton
@pytest.mark.parametrize("M", [0, 1, 5, 8, 37])
def test_col_tma_layout(M):
    """DeepGEMM's LHS scales: [M, G] view of column-major [G, M_pad] storage, M_pad a multiple of 4."""
    x = torch.randn(M, 300).to(DEV)
    q, s = fq.quant_fp8_groups(x, scale_layout="col_tma")
    _, s_row = fq.quant_fp8_groups(x)
    m_pad = -(-M // 4) * 4
    assert s.shape == (M, 3) and s.stride() == (1, m_pad) and s.dtype == torch.float32
    assert s.untyped_storage().nbytes() >= 4 * 3 * m_pad and s.data_ptr() % 16 == 0
    assert torch.equal(s, s_row) and s_row.stride() == (3, 1) and q.shape == (M, 300)
    s_twin = fq.quant_fp8_groups_torch(x.cpu(), scale_layout="col_tma")[1]
    assert s_twin.stride() == (1, m_pad) and torch.equal(s_twin, s_row.cpu())


@needs_triton
def test_empty_and_strided_rows():
    assert fq.quant_fp8_groups(torch.empty(0, 7168, device=DEV))[1].shape == (0, 56)
    assert fq.quant_fp8_groups(torch.empty(3, 0, device=DEV))[0].shape == (3, 0)
    x = torch.randn(6, 400, device=DEV)[:, :260]  # row stride 400: rows need only be contiguous
    q, s = fq.quant_fp8_groups(x)
    q2, s2 = fq.quant_fp8_groups_torch(x)
    assert torch.equal(as_bytes(q), as_bytes(q2)) and torch.equal(s, s2)


@settings(max_examples=25)
@given(st.integers(0, 3), st.integers(0, 70), st.integers(1, 90), st.sampled_from([(16, 32), (7, 16), (128, 128)]),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2**31 - 1))
def test_block_quant_matches_reference(E, N, K, block, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(E, N, K, generator=gen) * 10.0 ** torch.empty(E, N, 1).uniform_(-3, 2, generator=gen))
    w[:, :7] = 0.0  # zero rows: all-zero blocks for b0 = 7 (scale 1), zero rows inside the other blocks
    w = w.to(dtype)
    q, s = fq.quant_fp8_blocks(w, block)
    qr, sr = ref.quant_blocks_ref(w, block)
    assert s.shape == (E, -(-N // block[0]), -(-K // block[1])) and s.dtype == torch.float32
    assert torch.equal(as_bytes(q), as_bytes(qr)) and torch.equal(s.double(), sr)
    # in chunks of one expert (and of a 4-D weight's flattened leading slices): the same bytes
    for w_, chunk in ((w, 1), (w.view(1, E, N, K)[:, :, :, :], max(1, N * K))):
        qc, sc = fq.quant_fp8_blocks(w_, block, chunk_elems=chunk)
        assert torch.equal(as_bytes(qc).view_as(as_bytes(q)), as_bytes(q)) and torch.equal(sc.view_as(s), s)
    deq = fq.dequant_fp8_blocks(q, s, block)
    assert torch.equal(deq.double(), ref.dequant_blocks_ref(q, s, block).float().double())
    # one expert per chunk, into a strided bf16 view: the float32 values rounded once
    into = torch.full((E, N, 2 * K), 7.0, dtype=torch.bfloat16)[..., ::2]
    assert fq.dequant_fp8_blocks(q, s, block, out=into, chunk_elems=1) is into
    assert torch.equal(into, deq.to(torch.bfloat16))


def test_weight_blocks_deepseek_shape_and_zero_block():
    w = torch.randn(2, 300, 200)
    w[1, 128:256, :128] = 0.0  # one all-zero block: scale 1, q 0
    q, s = fq.quant_fp8_blocks(w)
    assert q.shape == (2, 300, 200) and s.shape == (2, 3, 2) and s[1, 1, 0] == 1.0
    assert not as_bytes(q[1, 128:256, :128]).any()
    qr, sr = ref.quant_blocks_ref(w)
    assert torch.equal(as_bytes(q), as_bytes(qr)) and torch.equal(s.double(), sr)


def test_argument_errors():
    x = torch.randn(4, 256)
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        fq.quant_fp8_groups(x[None])
    with pytest.raises(TypeError, match="x must have dtype"):
        fq.quant_fp8_groups(x.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous rows"):
        fq.quant_fp8_groups(torch.randn(256, 4).t())
    with pytest.raises(ValueError, match="group must be a power of two"):
        fq.quant_fp8_groups(x, group=100)
    with pytest.raises(ValueError, match="scale_layout must be one of"):
        fq.quant_fp8_groups_torch(x, scale_layout="col")
    with pytest.raises(ValueError, match="at least 2-D"):
        fq.quant_fp8_blocks(torch.randn(5))
    with pytest.raises(ValueError, match="chunk_elems must be a positive int"):
        fq.quant_fp8_blocks(torch.randn(2, 4, 4), chunk_elems=0)
    q, s = fq.quant_fp8_blocks(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="out must be a float tensor of q's shape"):
        fq.dequant_fp8_blocks(q, s, out=torch.empty(2, 3, 4, 5))
    with pytest.raises(ValueError, match="out's leading dims must flatten"):
        fq.dequant_fp8_blocks(q, s, out=torch.empty(3, 2, 4, 4).transpose(0, 1))
    with pytest.raises(TypeError, match="w must have a float dtype"):
        fq.quant_fp8_blocks(x.to(F8))
    with pytest.raises(ValueError, match="block must be two positive ints"):
        fq.quant_fp8_blocks(x, (0, 128))
    q, s = fq.quant_fp8_blocks(x)
    with pytest.raises(ValueError, match=r"needs float scales of shape \(1, 2\)"):
        fq.dequant_fp8_blocks(q, s[:, :1])
    with pytest.raises(TypeError, match="q must be a torch.float8_e4m3fn tensor"):
        fq.dequant_fp8_blocks(x, s)
