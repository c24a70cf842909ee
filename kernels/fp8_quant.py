"""Block-scaled FP8 (e4m3fn) quantisation, DeepSeek-V3's scheme: activations per token per 128 channels
(`quant_fp8_groups`, a Triton kernel, and its torch twin), weights per 128 x 128 block (`quant_fp8_blocks`,
torch: weights are quantised offline) and back (`dequant_fp8_blocks`). One implementation: the checkpoint
loader's nanomoe_fn/model/fp8.py delegates here.

Dimension legend: M rows (tokens), K columns (channels), g the group width (128), G = ceil(K / g) groups,
M_pad = M rounded up to a multiple of 4 (16 bytes of float32: DeepGEMM's TMA alignment), BM rows per
program; weights [.., N, K] with leading dims (experts) and blocks b0 x b1, Nb = ceil(N / b0),
Kb = ceil(K / b1).

The scheme, in float32 arithmetic (the same on every path, so all of them agree bit for bit):
    amax  = max |x| over the block / group (exact)
    scale = amax / 448 (float32 division; 1 where that is 0: an all-zero block)
    q     = e4m3(clamp(x / scale, -448, 448))   (float32 division, then round to nearest even)
and the real value is q * scale (`weight_scale_inv` in a checkpoint). Two-term activations (terms=2) add
    lo    = e4m3(x / scale - q)    (x / scale - q exact in float32; at most 16: half the spacing at 256-448)
with the value (q + lo) * scale: e4m3's 3 mantissa bits become ~7 (bf16 has 8) wherever |x / scale| >= 1/4
(below, lo's subnormal spacing 2^-9 bounds the error by 2^-10 * scale: nothing next to the group's amax of
448 * scale), so FP8 MMAs reach about bf16's accuracy. Both terms share the scale, so an MMA adds them in one
accumulator chain. They sit side by side, q [M, 2K] = [hi | lo]. Inputs must be finite (not checked:
that would read values). The last block/group of a dim that is
not a multiple of the block is partial: its scale comes from the elements it has.

The Triton kernel rounds onto the e4m3 grid itself in float32 (spacing 2^(floor(log2 |v|) - 3), 2^-9 below
2^-6) and only then converts: a grid value converts exactly everywhere (Triton's interpreter rounds some
off-grid values wrongly), and its divisions are `div_rn` (a GPU's default float32 `/` is approximate). The
torch twin divides tensor by tensor: CUDA torch turns a division by a Python scalar into a multiplication.

Scale layouts of `quant_fp8_groups`: "row" float32 [M, G] contiguous; "col_tma" DeepGEMM's LHS layout,
float32 column-major [G, M_pad] storage returned as the [M, G] view with strides (1, M_pad) (padding
entries are left unwritten).
"""

from __future__ import annotations

import torch

try:  # the torch functions (weights, the twin) run without Triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with torch on Linux
    triton = tl = None

from nanomoe_kernels.launch import Launcher

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
DEFAULT_BLOCK = (128, 128)
GROUP = 128
SCALE_LAYOUTS = ("row", "col_tma")
TMA_ALIGN = 4  # float32 scales per 16 bytes
IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BM = 16


def _jit(**kw):
    return (lambda fn: fn) if triton is None else triton.jit(**kw)


@_jit()
def _round_e4m3(v):
    """Round float32 v (|v| <= 448) to the nearest e4m3fn value, ties to even; the sign (of 0 too) kept."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    a = mag.to(tl.float32, bitcast=True)
    e = tl.maximum((mag >> 23) - 127, -6)  # floor(log2 a), at least -6 (e4m3's subnormals: spacing 2^-9)
    inv = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e): a * inv in [0, 16), exact
    step = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3), the grid spacing
    r = ((a * inv + 12582912.0) - 12582912.0) * step  # + 1.5 * 2^23 rounds [0, 16) to an integer, ties to even
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@_jit(do_not_specialize=["M", "stride_sg"])
def _quant_groups_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
                         GROUP: tl.constexpr, BM: tl.constexpr, TERMS: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.div_rn(amax, tl.full([BM], 448.0, tl.float32))
    scale = tl.where(scale > 0.0, scale, 1.0)
    v = tl.div_rn(x, scale[:, None])
    v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    q = _round_e4m3(v)
    tl.store(q_ptr + r64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    if TERMS == 2:  # the lo term, K columns on
        lo = _round_e4m3(v - q)
        tl.store(q_ptr + r64[:, None] * stride_qm + K + cols[None, :], lo.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + r64 * stride_sm + g * stride_sg, scale, mask=row_ok)


_launch = Launcher(_quant_groups_kernel)


def runs_interpreted() -> bool:
    """True when the kernel was decorated under TRITON_INTERPRET=1 (it then takes CPU tensors)."""
    return type(_quant_groups_kernel).__name__ == "InterpretedFunction"


def _scales(M: int, G: int, layout: str, device: torch.device) -> torch.Tensor:
    """Uninitialised float32 scales [M, G] in `layout`."""
    if layout == "row":
        return torch.empty(M, G, dtype=torch.float32, device=device)
    m_pad = -(-M // TMA_ALIGN) * TMA_ALIGN
    # the whole [G, M_pad] storage (a TMA box may cover the padding), viewed as [M, G]
    return torch.empty(G * m_pad, dtype=torch.float32, device=device).as_strided((M, G), (1, m_pad))


def check_terms(terms: object, name: str = "terms") -> None:
    """ValueError naming `name` unless terms is 1 or 2 (one- or two-term activations)."""
    if terms not in (1, 2) or isinstance(terms, bool):
        raise ValueError(f"{name} must be 1 or 2 (one- or two-term FP8 activations), got {terms!r}")


def _check_groups(x: torch.Tensor, group: int, scale_layout: str, want_stride: bool, terms: int = 1) -> None:
    check_terms(terms)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got shape {tuple(x.shape)}")
    if x.dtype not in IN_DTYPES:
        raise TypeError(f"x must have dtype in {[str(d) for d in IN_DTYPES]}, got {x.dtype}")
    if not isinstance(group, int) or group < 16 or group & (group - 1):
        raise ValueError(f"group must be a power of two >= 16 (DeepSeek-V3: 128), got {group!r}")
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")
    if want_stride and x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have contiguous rows (stride(1) == 1), got strides {tuple(x.stride())}")


def quant_fp8_groups(x: torch.Tensor, group: int = GROUP, scale_layout: str = "row",
                     terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (float32/float16/bfloat16, rows contiguous) -> (q [M, K] float8_e4m3fn, scales [M, G] float32),
    one scale per row per `group` columns (the Triton kernel; scale layouts in the module docstring);
    terms=2: q [M, 2K] = [hi | lo] (the two-term scheme). No host sync: the launch needs shapes only."""
    _check_groups(x, group, scale_layout, want_stride=True, terms=terms)
    if triton is None:
        raise RuntimeError("quant_fp8_groups needs Triton; use quant_fp8_groups_torch")
    if x.device.type == "cpu" and not runs_interpreted():
        raise ValueError("x is on the CPU: the Triton kernel runs there only under TRITON_INTERPRET=1 "
                         "(or use quant_fp8_groups_torch)")
    M, K = x.shape
    G = -(-K // group)
    q = torch.empty(M, terms * K, dtype=FP8_DTYPE, device=x.device)
    scales = _scales(M, G, scale_layout, x.device)
    if M and K:
        _launch((triton.cdiv(M, _BM), G), x, q, scales, M, K, x.stride(0), q.stride(0), scales.stride(0),
                scales.stride(1), GROUP=group, BM=_BM, TERMS=terms, num_warps=4)
    return q, scales


def quant_fp8_groups_torch(x: torch.Tensor, group: int = GROUP, scale_layout: str = "row",
                           terms: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as quant_fp8_groups, bit for bit, in torch (CPU paths; a second oracle). Any strides."""
    _check_groups(x, group, scale_layout, want_stride=False, terms=terms)
    q, s = _quant(x, (1, group))
    out = _scales(x.shape[0], s.shape[1], scale_layout, x.device)
    out.copy_(s)
    if terms == 2:
        q = torch.cat([q, _lo_term(x, q, s, group)], dim=1)
    return q, out


def _lo_term(x: torch.Tensor, hi: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    """The two-term scheme's lo [M, K] of x [M, K] given hi [M, K] fp8 and scales s [M, G] (float32 math)."""
    M, K = x.shape
    sc = s.repeat_interleave(group, dim=1)[:, :K]
    v = (x.to(torch.float32) / sc).clamp_(-FP8_MAX, FP8_MAX)
    return (v - hi.to(torch.float32)).to(FP8_DTYPE)


def _block(block: object) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and b >= 1 for b in block)):
        raise ValueError(f"block must be two positive ints (b0, b1), got {block!r}")
    return int(block[0]), int(block[1])


def block_scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """[.., Nb, Kb] = [.., ceil(N / b0), ceil(K / b1)] for a weight of shape [.., N, K]."""
    *lead, N, K = shape
    return (*lead, -(-N // block[0]), -(-K // block[1]))


def _quant(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheme in torch: w [.., N, K] -> (q [.., N, K] fp8, scales [.., Nb, Kb] float32)."""
    *lead, N, K = w.shape
    b0, b1 = block
    Nb, Kb = block_scale_shape((N, K), block)
    # pad to whole blocks with zeros (they never raise a block's max), then view the blocks
    pad = w.new_zeros((*lead, Nb * b0, Kb * b1), dtype=torch.float32)
    pad[..., :N, :K] = w
    blocks = pad.view(*lead, Nb, b0, Kb, b1)
    amax = blocks.abs().amax(dim=(-3, -1))
    scale = amax / torch.full_like(amax, FP8_MAX)  # tensor / tensor: a true division on CUDA too
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    v = (blocks / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    q = v.to(FP8_DTYPE).view(*lead, Nb * b0, Kb * b1)[..., :N, :K].contiguous()
    return q, scale


CHUNK_ELEMS = 1 << 26  # quant_fp8_blocks' float32 temporaries: ~3 x 256 MB per chunk of leading slices


def quant_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                     chunk_elems: int = CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """w [.., N, K] (any float dtype; leading dims such as experts are batched) -> (q [.., N, K] float8_e4m3fn,
    scales [.., Nb, Kb] float32), one scale per b0 x b1 block, the last ones partial. Torch: offline use.
    The leading slices go through in chunks of about `chunk_elems` elements (at least one slice), so the
    float32 temporaries stay near 3 x 4 x chunk_elems bytes whatever the weight's size (V3's 256 experts of a
    layer are 15 G elements); the result does not depend on the chunking."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() < 2:
        raise ValueError(f"w must be [.., N, K] (at least 2-D), got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point or w.dtype == FP8_DTYPE:
        raise TypeError(f"w must have a float dtype to quantise (not {FP8_DTYPE}), got {w.dtype}")
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ValueError(f"chunk_elems must be a positive int, got {chunk_elems!r}")
    block = _block(block)
    *lead, N, K = w.shape
    step = max(1, chunk_elems // max(1, N * K))
    if w.numel() == 0 or step >= w.numel() // (N * K):
        return _quant(w, block)
    flat = w.reshape(-1, N, K)
    q = torch.empty(flat.shape, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((flat.shape[0], *block_scale_shape((N, K), block)), dtype=torch.float32, device=w.device)
    for i in range(0, flat.shape[0], step):
        q[i:i + step], s[i:i + step] = _quant(flat[i:i + step], block)
    return q.view(*lead, N, K), s.view(*lead, *s.shape[1:])


def dequant_fp8_blocks(q: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                       out: torch.Tensor | None = None, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor:
    """q [.., N, K] float8_e4m3fn times its block's scale (scales [.., Nb, Kb], any float dtype, any strides)
    -> float32 [.., N, K] on q's device, or written into `out` (q's shape and device, any float dtype and
    strides: the float32 product is rounded once into it). Activation groups are blocks (1, g). The leading
    slices go through in chunks of about `chunk_elems` elements, as quant_fp8_blocks'."""
    block = _block(block)
    if not isinstance(q, torch.Tensor) or q.dtype != FP8_DTYPE or q.dim() < 2:
        raise TypeError(f"q must be a {FP8_DTYPE} tensor [.., N, K], got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}"
                        f"{tuple(q.shape) if isinstance(q, torch.Tensor) else ''}")
    want = block_scale_shape(tuple(q.shape), block)
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != want or not scales.dtype.is_floating_point:
        got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"FP8 weight {tuple(q.shape)} needs float scales of shape {want} for blocks {block}, "
                         f"got {got}")
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    elif (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.device != q.device
          or not out.dtype.is_floating_point or out.dtype == FP8_DTYPE):
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a float tensor of q's shape {tuple(q.shape)} on {q.device}, got {got}")
    if isinstance(chunk_elems, bool) or not isinstance(chunk_elems, int) or chunk_elems < 1:
        raise ValueError(f"chunk_elems must be a positive int, got {chunk_elems!r}")
    N, K = q.shape[-2:]
    if q.numel() == 0:
        return out
    step = max(1, chunk_elems // (N * K))
    qf, sf = q.reshape(-1, N, K), scales.reshape(-1, *scales.shape[-2:])
    try:
        of = out.view(-1, N, K)  # written through: a view of out, never a copy
    except RuntimeError as err:
        raise ValueError(f"out's leading dims must flatten to one without a copy, got strides {out.stride()}") from err
    for i in range(0, qf.shape[0], step):
        s = sf[i:i + step].to(device=q.device, dtype=torch.float32)
        s = s.repeat_interleave(block[0], dim=-2)[..., :N, :].repeat_interleave(block[1], dim=-1)[..., :K]
        of[i:i + step] = qf[i:i + step].to(torch.float32) * s
    return out
