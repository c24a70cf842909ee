"""bench/peers_sgl.py: SGLang's kernel files import through our stubs, the fused-MoE peer matches the float
reference on a tiny case under the Triton interpreter (float32), and failures say how to fix them.

Tests never import bench/: each check runs `python -c <script>` (the script imports bench.peers_sgl and
prints one JSON line), all side by side in one fixture.

Dimension legend: T tokens, k top-k, E experts, H hidden, I intermediate.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from tests.helpers import run_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PEERS = all(os.path.isfile(os.path.join(ROOT, ".peers", "sgl", f)) for f in
                 ("fused_moe_triton_kernels.py", "decode_attention.py", "score_mod.py"))
HOW = "put sglang 0.5.23's kernel files in .peers/sgl"

PRELUDE = """
import json, sys, traceback
import torch
from bench import peers_sgl as P
def emit(**kw):
    print(json.dumps(kw))
"""
SCRIPTS = {
    "load": """
        moe, dec = P.load_sgl_moe(), P.load_sgl_decode()
        envs = sys.modules["sglang.srt.environ"].envs
        emit(moe=[n for n in ("invoke_fused_moe_kernel", "act_and_mul_triton", "moe_sum_reduce_triton")
                  if callable(getattr(moe, n, None))],
             decode=[n for n in ("decode_attention_fwd", "decode_attention_fwd_grouped")
                     if callable(getattr(dec, n, None))],
             again=P.load_sgl_moe() is moe, pdl=sys.modules["sglang.kernels.jit.utils"].is_arch_support_pdl(),
             padding=moe.padding_size, lean_mult=envs.SGLANG_FORCE_LEAN_GRID_CU_MULT.get())
    """,
    "moe": """
        from nanomoe_reference.expert_rows import make_routing, make_weights, reference_rows
        mod = P.load_sgl_moe()
        T, E, k, H, I = 7, 5, 2, 32, 16
        w = make_weights(E, H, I, "swiglu", torch.float32, "cpu", seed=3)
        x = torch.randn(T, H, generator=torch.Generator().manual_seed(4))
        ids, tw = make_routing(T, E, k, "cpu", seed=5)
        ref = reference_rows(x, ids, tw, w, "swiglu", torch.arange(T))
        errs = {}
        try:
            for name, cfg in (("small", dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=16, BLOCK_SIZE_K=16, GROUP_SIZE_M=2)),
                              ("default", P.sgl_default_config(T, E))):
                out = P.sgl_fused_moe_call(mod, x, *w, ids, tw.contiguous(), cfg)
                errs[name] = float((out - ref).norm() / ref.norm())
        except Exception as err:
            emit(interpreter_error=f"{type(err).__name__}: {err}")
        else:
            emit(errs=errs, shape=list(out.shape), dtype=str(out.dtype))
    """,
    "align": """
        ids = torch.tensor([[2, 0], [2, 1], [0, 2], [2, 3]], dtype=torch.int32)
        s, e, n = P.sgl_align(ids, 5, 4)
        emit(sorted=s.tolist(), experts=e.tolist(), post=n.tolist(), dtypes=[str(t.dtype) for t in (s, e, n)])
    """,
    "missing": """
        try:
            P.load_sgl_moe("/nonexistent/peers")
        except FileNotFoundError as err:
            emit(kind="FileNotFoundError", msg=str(err))
    """,
    "broken": """
        import tempfile, pathlib
        d = pathlib.Path(tempfile.mkdtemp())
        (d / "fused_moe_triton_kernels.py").write_text("from sglang.srt.utils import no_such_name\\n")
        try:
            P.load_sgl_moe(str(d))
        except ImportError as err:
            emit(kind="ImportError", msg=str(err), left=[m for m in sys.modules if m.startswith("nanomoe_peer_sgl")])
    """,
}


@pytest.fixture(scope="module")
def runs() -> dict:
    cmds = {key: (["-c", PRELUDE + textwrap.dedent(body)], {"TRITON_INTERPRET": "1"}) for key, body in SCRIPTS.items()
            if HAVE_PEERS or key not in ("load", "moe")}
    out = {}
    for key, proc in run_commands(cmds, timeout_s=300).items():
        assert proc.returncode == 0, (key, proc.stderr[-3000:])
        out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.skipif(not HAVE_PEERS, reason=f"no SGLang kernel files: {HOW}")
def test_sglang_files_import_through_the_stubs(runs):
    got = runs["load"]
    assert got["moe"] == ["invoke_fused_moe_kernel", "act_and_mul_triton", "moe_sum_reduce_triton"]
    assert got["decode"] == ["decode_attention_fwd", "decode_attention_fwd_grouped"]
    assert got["again"] is True and got["pdl"] is False and got["padding"] == 0 and got["lean_mult"] == 1.0


@pytest.mark.skipif(not HAVE_PEERS, reason=f"no SGLang kernel files: {HOW}")
def test_sglang_fused_moe_matches_reference_interpreted(runs):
    got = runs["moe"]
    if "interpreter_error" in got:
        pytest.skip(f"SGLang's kernels do not run under TRITON_INTERPRET=1 here: {got['interpreter_error']}")
    assert got["shape"] == [7, 32] and got["dtype"] == "torch.float32"
    for name, err in got["errs"].items():
        assert err < 1e-5, (name, err)


def test_sgl_align_layout(runs):
    """Pairs (t*k + j) grouped by expert, each expert padded to 4 rows with N = 8; blocks name their expert."""
    got = runs["align"]
    # expert 0: pairs 1, 4; expert 1: pair 3; expert 2: pairs 0, 2, 5, 6; expert 3: pair 7; expert 4: none
    assert got["sorted"][:16] == [1, 4, 8, 8, 3, 8, 8, 8, 0, 2, 5, 6, 7, 8, 8, 8]
    assert set(got["sorted"][16:]) <= {8} and len(got["sorted"]) % 4 == 0
    assert got["experts"][:4] == [0, 1, 2, 3] and set(got["experts"][4:]) <= {-1}
    assert got["post"] == [16] and got["dtypes"] == ["torch.int32"] * 3


def test_missing_and_broken_peer_files_say_how_to_fix(runs):
    assert runs["missing"]["kind"] == "FileNotFoundError" and HOW in runs["missing"]["msg"]
    broken = runs["broken"]
    assert broken["kind"] == "ImportError" and HOW in broken["msg"] and "no_such_name" in broken["msg"]
    assert broken["left"] == []  # a failed import leaves no half-made module behind
