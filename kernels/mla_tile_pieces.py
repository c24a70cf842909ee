"""A cache tile of the warp-specialised MLA stage 1 in pieces: each piece lands on its own mbarrier, so the scores'
MMAs start on the first columns while the rest of the tile is still on its way.

Dimension legend: BN = 64 cache rows per tile, CH = C / 2 columns per latent half, PW columns per piece (64: the
128-byte swizzle's width, or CH when 64 does not divide it), NCH = CH / PW pieces per half, Dr rope dims,
NP = 2 * NCH + 1 pieces per tile (latent half 0, latent half 1, then the rope key: the order the whole tile's
q . k^T steps through them, so the scores are bit-equal to one wait for the whole tile), or NP = 1 (the whole
tile on one mbarrier). k_ready holds NP mbarriers per ring stage ([2 * NP, 1]); NP is read from its shape, a
constexpr the partitions of gl.warp_specialize see as one (Triton 3.6 does not prune on constexpr arguments).

Why: at one query row every program's first tile comes from HBM at once (~2.4 us, mla_notes.md), and the score
warpgroup's q . k^T over it (~1.3 us) started only after its last byte.
"""

from __future__ import annotations

from nanomoe_kernels.mla_decode_wgmma import gluon

PIECE_COLS = 64


def piece_cols(ch: int) -> int:
    """Columns per latent piece for latent halves of ch columns (PW in the legend)."""
    return PIECE_COLS if ch % PIECE_COLS == 0 else ch


def pieces_per_tile(ch: int) -> int:
    """NP for latent halves of ch columns, tiles in pieces."""
    return 2 * (ch // piece_cols(ch)) + 1


if gluon is not None:
    from nanomoe_kernels.mla_decode_wgmma import _tma_load
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma

    @gluon.jit
    def issue_tile(kl_desc, kp_desc, kc_desc, k_ready, st, k0, k1, kp, row0):
        """TMA of cache rows row0 .. row0 + BN into ring stage st (k0 / k1 / kp: that stage's buffers), whole
        (NP = 1: kl_desc's [BN, CH] blocks) or in pieces (kc_desc's [BN, PW] blocks), in the order they are scored."""
        CH: gl.constexpr = kl_desc.block_type.shape[1]
        NP: gl.constexpr = k_ready.type.shape[0] // 2
        if NP == 1:
            bar = k_ready.index(st)
            mbarrier.expect(bar, 2 * kl_desc.block_type.nbytes + kp_desc.block_type.nbytes)
            _tma_load(kl_desc, [row0, 0], bar, k0)
            _tma_load(kl_desc, [row0, CH], bar, k1)
            _tma_load(kp_desc, [row0, 0], bar, kp)
        else:
            PW: gl.constexpr = kc_desc.block_type.shape[1]
            NCH: gl.constexpr = CH // PW
            for j in gl.static_range(2 * NCH):
                bar = k_ready.index(st * NP + j)
                mbarrier.expect(bar, kc_desc.block_type.nbytes)
                if j < NCH:
                    _tma_load(kc_desc, [row0, j * PW], bar, k0.slice(j * PW, PW, 1))
                else:
                    _tma_load(kc_desc, [row0, j * PW], bar, k1.slice((j - NCH) * PW, PW, 1))
            bar = k_ready.index(st * NP + 2 * NCH)
            mbarrier.expect(bar, kp_desc.block_type.nbytes)
            _tma_load(kp_desc, [row0, 0], bar, kp)

    @gluon.jit
    def wait_tile(k_ready, st, phase):
        """Wait until every piece of ring stage st has landed (phase: the stage's fill parity)."""
        NP: gl.constexpr = k_ready.type.shape[0] // 2
        for j in gl.static_range(NP):
            mbarrier.wait(k_ready.index(st * NP + j), phase)

    @gluon.jit
    def last_piece(k_ready, st):
        """The mbarrier of ring stage st's last-issued piece (the whole tile's when NP = 1)."""
        NP: gl.constexpr = k_ready.type.shape[0] // 2
        return k_ready.index(st * NP + NP - 1)

    @gluon.jit
    def score_tile(q0, q1, qp, k0, k1, kp, k_ready, st, phase, s):
        """Issue s = q . k^T over ring stage st (async wgmmas; the caller waits for them), each piece's MMAs once
        that piece has landed. s: a zero [BH, BN] float32 accumulator (its layout)."""
        NP: gl.constexpr = k_ready.type.shape[0] // 2
        if NP == 1:
            mbarrier.wait(k_ready.index(st), phase)
            s = warpgroup_mma(q0, k0.permute((1, 0)), s, use_acc=False, is_async=True)
            s = warpgroup_mma(q1, k1.permute((1, 0)), s, is_async=True)
        else:
            NCH: gl.constexpr = (NP - 1) // 2
            PW: gl.constexpr = k0.type.shape[1] // NCH
            for j in gl.static_range(NCH):
                mbarrier.wait(k_ready.index(st * NP + j), phase)
                s = warpgroup_mma(q0.slice(j * PW, PW, 1), k0.slice(j * PW, PW, 1).permute((1, 0)), s,
                                  use_acc=j > 0, is_async=True)
            for j in gl.static_range(NCH):
                mbarrier.wait(k_ready.index(st * NP + NCH + j), phase)
                s = warpgroup_mma(q1.slice(j * PW, PW, 1), k1.slice(j * PW, PW, 1).permute((1, 0)), s,
                                  is_async=True)
            mbarrier.wait(k_ready.index(st * NP + NP - 1), phase)
        return warpgroup_mma(qp, kp.permute((1, 0)), s, is_async=True)
