"""Checkpoints loaded with the routed experts kept in block-scaled FP8 (load_checkpoint(fp8_experts=True)).

Dimension legend: E experts, H hidden, I expert intermediate, Ib = I / 128 scale row blocks per half.
An FP8 checkpoint's expert tensors must arrive byte for byte as stored (gate and up stacked into w13 with
their scales, only this rank's slots); a bf16/fp32 one is quantised at load exactly as quantize_experts
does; dequantised, both equal the ordinary load; and the model runs them with the triton_fp8 backend
(CPU interpreter) within the FP8 activation error of the ordinary model.
"""

import json
import os
from dataclasses import replace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nanomoe_fn import MLAConfig, Placement  # noqa: E402
from nanomoe_fn.model.checkpoint import load_checkpoint, named_tensors, save_checkpoint, save_tensors  # noqa: E402
from nanomoe_fn.model.config import model_preset  # noqa: E402
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward  # noqa: E402
from nanomoe_fn.model.hf_config import config_to_hf  # noqa: E402
from nanomoe_fn.model.params import init_model_params  # noqa: E402
from nanomoe_fn.moe.fp8_params import dequantize_experts, quantize_experts  # noqa: E402
from nanomoe_fn.moe.params import SwiGLUExpertsFP8  # noqa: E402
from tests.model_fixtures import quantize_fp8  # noqa: E402
from tests.test_fused_moe_fp8 import fmk  # noqa: E402 (reloads the kernels under the interpreter)

F32 = torch.float32
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _cfg():
    base = model_preset("tiny")
    return base.with_(mla=MLAConfig.preset("tiny", hidden_size=128), moe=base.moe.with_(hidden=128, intermediate=128))


def _fp8_checkpoint(path, cfg, params) -> dict:
    tensors = named_tensors(cfg, params)
    fp8 = {n: quantize_fp8(t) for n, t in tensors.items()
           if t.dim() == 2 and "embed" not in n and "lm_head" not in n and not n.endswith("mlp.gate.weight")}
    for n, (q, s) in fp8.items():
        tensors[n], tensors[n + "_scale_inv"] = q, s
    save_tensors(path, tensors)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg) | {"quantization_config": QUANT}))
    return fp8


def test_fp8_checkpoint_experts_arrive_as_stored(tmp_path):
    cfg = _cfg()
    fp8 = _fp8_checkpoint(tmp_path, cfg, init_model_params(cfg, F32, seed=3))
    _, shard = load_checkpoint(tmp_path, dtype=F32, placement=Placement.identity(8, 2), rank=1, fp8_experts=True)
    _, plain = load_checkpoint(tmp_path, dtype=F32)
    I_ = cfg.moe.intermediate
    for i in (1, 2):
        ex = shard.layers[i].moe.experts
        assert isinstance(ex, SwiGLUExpertsFP8) and ex.num_experts == 4
        for j, e in enumerate(range(4, 8)):
            name = f"model.layers.{i}.mlp.experts.{e}."
            for rows, scales, proj in ((slice(0, I_), slice(0, 1), "gate_proj"), (slice(I_, 2 * I_), slice(1, 2),
                                                                                   "up_proj")):
                q, s = fp8[name + proj + ".weight"]
                assert torch.equal(ex.w13[j, rows].view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(ex.w13_scale[j, scales], s)
            q, s = fp8[name + "down_proj.weight"]
            assert torch.equal(ex.w2[j].view(torch.uint8), q.view(torch.uint8)) and torch.equal(ex.w2_scale[j], s)
        deq = dequantize_experts(ex, F32)
        assert torch.equal(deq.w13, plain.layers[i].moe.experts.w13[4:])
        assert torch.equal(deq.w2, plain.layers[i].moe.experts.w2[4:])
        assert torch.equal(shard.layers[i].moe.shared.w13, plain.layers[i].moe.shared.w13)  # not FP8: dequantised


def test_float_checkpoint_is_quantised_at_load_like_quantize_experts(tmp_path):
    cfg = _cfg()
    save_checkpoint(tmp_path, cfg, init_model_params(cfg, F32, seed=4))
    _, fp8 = load_checkpoint(tmp_path, dtype=F32, fp8_experts=True)
    _, plain = load_checkpoint(tmp_path, dtype=F32)
    want = quantize_experts(plain.layers[2].moe.experts)
    got = fp8.layers[2].moe.experts
    for a, b in ((got.w13, want.w13), (got.w2, want.w2)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(got.w13_scale, want.w13_scale) and torch.equal(got.w2_scale, want.w2_scale)
    _, empty = load_checkpoint(tmp_path, dtype=F32, placement=Placement.identity(8, 8), rank=0, fp8_experts=True)
    assert empty.layers[1].moe.experts.w13.shape == (1, 256, 128)


@pytest.mark.skipif(not fmk.runs_interpreted(), reason="the FP8 kernels run interpreted on the CPU")
@pytest.mark.filterwarnings("ignore:kernels.fused_moe_fp8. no tuned config")
def test_model_runs_fp8_experts(tmp_path):
    cfg = _cfg()
    _fp8_checkpoint(tmp_path, cfg, init_model_params(cfg, F32, seed=5))
    _, fp8 = load_checkpoint(tmp_path, dtype=F32, fp8_experts=True)
    _, plain = load_checkpoint(tmp_path, dtype=F32)
    ids = torch.randint(2, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(6).expand(2, 6)
    want, _ = model_forward(plain, ids, pos, init_caches(cfg, 2, 8, F32), ModelContext(cfg))
    got, _ = model_forward(fp8, ids, pos, init_caches(cfg, 2, 8, F32), ModelContext(cfg, expert_backend="triton_fp8"))
    # the same experts quantised in memory (quantize_experts) give the same logits, bit for bit
    layers = tuple(lay if lay.moe is None else replace(lay, moe=replace(lay.moe, experts=quantize_experts(
        lay.moe.experts))) for lay in plain.layers)
    again, _ = model_forward(replace(plain, layers=layers), ids, pos, init_caches(cfg, 2, 8, F32),
                             ModelContext(cfg, expert_backend="triton_fp8"))
    assert torch.equal(again, got)
    # each MoE layer is ~4% off (the activations' e4m3 rounding; tests/test_layer_fp8.py bounds it); this random
    # tiny model amplifies that ~4x by the logits. Wrong expert bytes (gate/up swapped, scales misplaced) are ~100%.
    err = float((got - want).norm() / want.norm())
    assert 0 < err < 0.3
    with pytest.raises(TypeError, match="expert backend 'bmm' runs bf16/fp16/fp32 experts"):
        model_forward(fp8, ids, pos, init_caches(cfg, 2, 8, F32), ModelContext(cfg))


@pytest.mark.skipif(not fmk.runs_interpreted(), reason="the FP8 kernels run interpreted on the CPU")
def test_cli_generates_with_fp8_experts(tmp_path):
    """`nanomoe generate --expert-backend triton_fp8` loads the experts as FP8 and equals the library."""
    import subprocess
    import sys

    from nanomoe_fn.model.generate import generate
    from nanomoe_fn.model.sampling import SamplingConfig
    from nanomoe_fn.model.tokenizer import load_tokenizer
    from tests.helpers import ROOT
    from tests.model_fixtures import tiny_tokenizer

    cfg = _cfg().with_(vocab_size=320)
    _fp8_checkpoint(tmp_path, cfg, init_model_params(cfg, F32, seed=6))
    tiny_tokenizer(tmp_path)
    r = subprocess.run([sys.executable, "-m", "nanomoe_fn.cli", "generate", "--checkpoint", str(tmp_path),
                        "--prompt", "fp8 experts", "--max-new-tokens", "4", "--ignore-eos", "--json", "--device",
                        "cpu", "--expert-backend", "triton_fp8"], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr
    _, params = load_checkpoint(tmp_path, dtype=F32, fp8_experts=True)
    want = generate(params, [load_tokenizer(tmp_path).encode("fp8 experts")],
                    ModelContext(cfg, expert_backend="triton_fp8"), SamplingConfig(max_new_tokens=4, ignore_eos=True))
    assert json.loads(r.stdout)["outputs"][0]["tokens"] == want[0]
