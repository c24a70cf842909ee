"""The `bmm` expert backend on the GPU: its activation is the Triton silu_mul over the live rows only
(padding rows skipped), so check it against the float64 reference and the `loop` backend in every layout,
with empty experts and both the all-experts and the selected-experts batch.

Dimension legend: P local experts, M batch rows, C capacity (masked layout), H hidden, I intermediate.
"""

import nanomoe_reference as reference
import pytest
import torch

from nanomoe_fn import ExpertBatch, expert_ffn
from nanomoe_fn.batch import to_masked
from nanomoe_fn.moe.params import SwiGLUExperts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _experts(P: int, H: int, I: int, dtype: torch.dtype, gen: torch.Generator) -> SwiGLUExperts:
    return SwiGLUExperts((torch.randn(P, 2 * I, H, generator=gen) / H ** 0.5).to("cuda", dtype),
                         (torch.randn(P, H, I, generator=gen) / I ** 0.5).to("cuda", dtype))


def reference_rows(experts: SwiGLUExperts, batch: ExpertBatch) -> torch.Tensor:
    """float64 [M, H] on the CPU: batch row m = its expert's SwiGLU FFN of its row (reference/)."""
    batch = batch.materialize()
    x = batch.x.double().cpu()
    out, start = torch.zeros_like(x), 0
    for e, n in enumerate(batch.counts.tolist()):
        if n:
            out[start:start + n] = reference.swiglu(x[start:start + n], experts.w13[e].double().cpu(),
                                                    experts.w2[e].double().cpu())
        start += n
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "output holds NaN/Inf"
    return float((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("counts", [(5, 0, 17, 1, 0, 9, 3, 64), (0, 0, 7, 0, 0, 0, 0, 0), (40,) * 8])
def test_bmm_matches_reference_and_loop(dtype, tol, counts):
    """Contiguous, gathered and masked batches; (0, 0, 7, ...) takes the selected-experts path."""
    gen = torch.Generator().manual_seed(sum(counts))
    P, H, I = len(counts), 256, 192
    experts = _experts(P, H, I, dtype, gen)
    c = torch.tensor(counts, device="cuda")
    M = int(c.sum())
    x = torch.randn(M, H, generator=gen).to("cuda", dtype)
    contiguous = ExpertBatch(x, c)
    rows = torch.randn(M + 3, H, generator=gen).to("cuda", dtype)
    index = torch.randperm(M + 3, generator=gen)[:M].to("cuda")
    gathered = ExpertBatch(rows, c, "gathered", index)
    for batch in (contiguous, gathered):
        want = reference_rows(experts, batch)
        got = expert_ffn(experts, batch, "bmm").x
        assert got.shape == (M, H) and _rel(got, want) < tol
        loop = expert_ffn(experts, batch, "loop").x
        assert _rel(got, loop.double().cpu()) < tol
    masked = to_masked(contiguous, max(counts) + 5)
    got = expert_ffn(experts, masked, "bmm").x
    want = reference_rows(experts, contiguous)
    live = torch.cat([got[e, :n] for e, n in enumerate(counts)])
    assert _rel(live, want) < tol
