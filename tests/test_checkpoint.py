"""Checkpoints (nanomoe_fn/model/checkpoint.py, names.py, fp8.py): transformers' own DeepSeek-V3 / V2-Lite
save_pretrained folders load with every tensor equal; expert-parallel ranks read only their experts;
save -> load round trips (single file, sharded); FP8 block dequantisation; one-line errors per defect.

Dimension legend: E experts, I expert intermediate, H hidden, W ranks.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors import safe_open as real_safe_open

from nanomoe_fn.attention.config import MLAConfig
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.model import checkpoint
from nanomoe_fn.model.checkpoint import load_checkpoint, named_tensors, save_checkpoint, save_tensors
from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.fp8 import dequantize_blocks, quantize_blocks
from nanomoe_fn.model.hf_config import config_to_hf
from nanomoe_fn.model.params import init_model_params
from tests.hf_models import tiny_v2_lite, tiny_v3
from tests.model_fixtures import dequantize_fp8, hf_tensors, quantize_fp8, rewrite

F32 = torch.float32


@pytest.fixture(scope="module")
def hf_ckpts(tmp_path_factory):
    """transformers-written checkpoints: V3 (q low-rank path, attention biases, random correction bias) and
    V2-Lite-like (q_proj, softmax routing, 2 shared experts)."""
    out = {}
    for name, model in (("v3", tiny_v3(attention_bias=True)), ("v2_lite", tiny_v2_lite())):
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our tiny preset with random weights, saved by save_checkpoint."""
    cfg = model_preset("tiny")
    params = init_model_params(cfg, F32, seed=1)
    path = tmp_path_factory.mktemp("ours")
    save_checkpoint(path, cfg, params)
    return path, cfg, params


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("which", ["v3", "v2_lite"])
def test_hf_checkpoint_loads_every_tensor(hf_ckpts, which):
    path, model = hf_ckpts[which]
    cfg, params = load_checkpoint(path, dtype=F32)
    assert_same(named_tensors(cfg, params), hf_tensors(model))  # names from hf_tensors' own split of experts
    for i, lp in enumerate(params.layers):
        hf = model.model.layers[i].mlp
        if lp.moe is None:
            assert torch.equal(lp.dense.w13, torch.cat([hf.gate_proj.weight, hf.up_proj.weight]))
            continue
        E, I_ = cfg.moe.num_experts, cfg.moe.intermediate
        for e in range(E):  # expert e's gate / up / down, and the stack order
            gate, up = hf.experts.gate_up_proj[e].chunk(2)
            assert torch.equal(lp.moe.experts.w13[e, :I_], gate) and torch.equal(lp.moe.experts.w13[e, I_:], up)
            assert torch.equal(lp.moe.experts.w2[e], hf.experts.down_proj[e])
        shared = hf.shared_experts
        assert torch.equal(lp.moe.shared.w13, torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        assert torch.equal(lp.moe.gate.weight, hf.gate.weight)
    attn, gate = params.layers[1].attn, params.layers[1].moe.gate
    if which == "v3":
        assert attn.q_proj is None and attn.q_a_bias is not None and attn.o_bias.abs().sum() > 0
        assert gate.bias is not None and gate.bias.abs().min() > 0
        assert torch.equal(gate.bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    else:
        assert attn.q_a_proj is None and attn.q_b_proj is None and attn.q_a_bias is None and gate.bias is None
        assert torch.equal(attn.q_proj, model.model.layers[1].self_attn.q_proj.weight)
        assert cfg.moe.n_shared_experts == 2 and cfg.moe.score_func == "softmax"


def test_dtype_and_device(hf_ckpts):
    path, model = hf_ckpts["v3"]
    cfg, p32 = load_checkpoint(path, dtype=F32)
    _, p16 = load_checkpoint(path, dtype=torch.bfloat16, device="cpu")
    moe16, moe32 = p16.layers[1].moe, p32.layers[1].moe
    assert moe16.gate.weight.dtype == F32 and moe16.gate.bias.dtype == F32  # routers stay float32
    assert torch.equal(moe16.gate.weight, moe32.gate.weight)
    for a, b in zip(named_tensors(cfg, p16).values(), named_tensors(cfg, p32).values()):
        if a.dtype != F32:
            assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16))


class _Counting:
    """safe_open that records every tensor name whose slice or data is asked for."""

    def __init__(self, reads: list) -> None:
        self.reads = reads

    def __call__(self, filename, framework, device="cpu"):
        handle, reads = real_safe_open(filename, framework=framework, device=device), self.reads

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_slice(self, name):
                reads.append(name)
                return handle.get_slice(name)

            def get_tensor(self, name):
                reads.append(name)
                return handle.get_tensor(name)

        return Handle()


def _expert_reads(reads: list) -> Counter:
    """(layer, expert) -> how many expert tensors were opened."""
    return Counter((int(n.split(".")[2]), int(n.split(".")[5])) for n in reads if ".mlp.experts." in n)


@pytest.mark.parametrize("phy2log, W, rank", [(list(range(8)), 2, 1), (list(range(8)), 2, 0),
                                              ([0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 5, 2], 3, 2)])
def test_ep_rank_reads_only_its_experts(hf_ckpts, monkeypatch, phy2log, W, rank):
    path, model = hf_ckpts["v3"]
    _, full = load_checkpoint(path, dtype=F32)
    placement = Placement.from_phy2log(torch.tensor(phy2log), 8, W)
    reads: list = []
    monkeypatch.setattr(checkpoint, "safe_open", _Counting(reads))
    cfg, local = load_checkpoint(path, dtype=F32, placement=placement, rank=rank)
    slots = placement.local_slots(rank)
    for i in (1, 2):
        assert torch.equal(local.layers[i].moe.experts.w13, full.layers[i].moe.experts.w13[slots])
        assert torch.equal(local.layers[i].moe.experts.w2, full.layers[i].moe.experts.w2[slots])
        assert torch.equal(local.layers[i].moe.shared.w13, full.layers[i].moe.shared.w13)
    # each held expert's 3 tensors opened once per MoE layer (replicas copied), no other expert's ever
    assert _expert_reads(reads) == {(i, e): 3 for i in (1, 2) for e in set(slots.tolist())}
    assert max(Counter(reads).values()) == 1


def test_round_trip_single_file(ours, tmp_path):
    path, cfg, params = ours
    assert not (path / "model.safetensors.index.json").exists()
    cfg2, loaded = load_checkpoint(path, dtype=F32)
    assert config_to_hf(cfg2) == config_to_hf(cfg)  # all a config.json carries (not e.g. the cache page size)
    assert_same(named_tensors(cfg2, loaded), named_tensors(cfg, params))
    tied = cfg.with_(tie_word_embeddings=True)
    tparams = init_model_params(tied, F32, seed=2)
    save_checkpoint(tmp_path, tied, tparams)
    with real_safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    cfg3, tloaded = load_checkpoint(tmp_path, dtype=F32)
    assert cfg3.tie_word_embeddings and tloaded.lm_head is tloaded.embed
    assert torch.equal(tloaded.embed, tparams.embed)


def test_sharded_save_with_index(ours, tmp_path):
    _, cfg, params = ours
    limit = 64 * 1024
    save_checkpoint(tmp_path, cfg, params, max_shard_bytes=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    assert not (tmp_path / "model.safetensors").exists()
    for f in files:  # every shard within the limit unless it holds a single bigger tensor
        with real_safe_open(str(tmp_path / f), "pt") as h:
            sizes = [h.get_tensor(n).nbytes for n in h.keys()]
        assert sum(sizes) <= limit or len(sizes) == 1
    _, loaded = load_checkpoint(tmp_path, dtype=F32)
    assert_same(named_tensors(cfg, loaded), named_tensors(cfg, params))
    _, half = load_checkpoint(tmp_path, dtype=F32, placement=Placement.identity(8, 2), rank=1)
    assert torch.equal(half.layers[2].moe.experts.w13, params.layers[2].moe.experts.w13[4:])


def test_save_refuses_ep_shard(tmp_path):
    cfg = model_preset("tiny")
    shard = init_model_params(cfg, F32, placement=Placement.identity(8, 2), rank=0)
    with pytest.raises(ValueError, match="layer 1 holds 4 of 8 experts.*expert-parallel"):
        save_checkpoint(tmp_path, cfg, shard)


def test_fp8_block_dequant(tmp_path):
    # hidden 160 and dense width 300: weights span several 128 x 128 blocks, the last ones partial
    base = model_preset("tiny")
    cfg = base.with_(dense_intermediate=300, mla=MLAConfig.preset("tiny", hidden_size=160),
                     moe=base.moe.with_(hidden=160))
    params = init_model_params(cfg, F32, seed=3)
    tensors = named_tensors(cfg, params)
    fp8 = {n: quantize_fp8(t) for n, t in tensors.items()
           if t.dim() == 2 and "embed" not in n and "lm_head" not in n and not n.endswith("mlp.gate.weight")}
    assert fp8["model.layers.0.mlp.gate_proj.weight"][1].shape == (3, 2)
    for n, (q, s) in fp8.items():
        tensors[n], tensors[n + "_scale_inv"] = q, s
    save_tensors(tmp_path, tensors)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg) | {"quantization_config": quant}))
    cfg2, loaded = load_checkpoint(tmp_path, dtype=F32)
    got, orig = named_tensors(cfg2, loaded), named_tensors(cfg, params)
    for n, t in orig.items():
        if n not in fp8:
            assert torch.equal(got[n], t), n
            continue
        q, s = fp8[n]
        torch.testing.assert_close(got[n], dequantize_fp8(q, s), rtol=0, atol=1e-6)
        # e4m3 keeps 3 mantissa bits: within 1/16 of the value (plus the subnormal step of its block)
        step = dequantize_fp8(torch.ones_like(q, dtype=F32).to(torch.float8_e4m3fn), s) / 512
        assert ((got[n] - t).abs() <= t.abs() / 16 + step).all(), n
        assert (got[n] - t).norm() / t.norm() < 0.05
    # the module's own quantiser agrees with the block-by-block one bit for bit, and dequantises back
    w = orig["model.layers.0.mlp.down_proj.weight"]
    q, s = quantize_blocks(w)
    assert torch.equal(q.view(torch.uint8), fp8["model.layers.0.mlp.down_proj.weight"][0].view(torch.uint8))
    assert torch.equal(s, fp8["model.layers.0.mlp.down_proj.weight"][1])
    assert torch.equal(dequantize_blocks(q, s), dequantize_fp8(q, s))


EXPERT = "model.layers.2.mlp.experts.7.up_proj.weight"
BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"
BAD = {
    "missing": (lambda t: {n: v for n, v in t.items() if n != EXPERT}, f"missing tensor '{EXPERT}'"),
    "shape": (lambda t: t | {"model.layers.1.self_attn.kv_b_proj.weight": torch.zeros(3, 3)},
              r"'model.layers.1.self_attn.kv_b_proj.weight' has shape \[3, 3\], expected \[128, 32\]"),
    "int dtype": (lambda t: t | {"model.norm.weight": torch.ones(64, dtype=torch.int64)},
                  "'model.norm.weight' has dtype I64"),
    "fp8 without scale": (lambda t: t | {EXPERT: t[EXPERT].to(torch.float8_e4m3fn)},
                          f"'{EXPERT}' is F8_E4M3 without its scales '{EXPERT}_scale_inv'"),
    "bad scale": (lambda t: t | {EXPERT: t[EXPERT].to(torch.float8_e4m3fn), EXPERT + "_scale_inv": torch.ones(2, 2)},
                  f"'{EXPERT}_scale_inv' has dtype F32 shape \\[2, 2\\], expected a float \\[1, 1\\]"),
    "nan router bias": (lambda t: t | {BIAS: torch.full_like(t[BIAS], float("nan"))},
                        rf"'{BIAS}' holds NaN/inf \(the router's correction bias picks the experts"),
    "unexpected": (lambda t: t | {"model.layers.1.mlp.extra.weight": torch.ones(2)},
                   "unexpected tensor 'model.layers.1.mlp.extra.weight'"),
}


@pytest.mark.parametrize("defect", sorted(BAD))
def test_bad_tensor_fails_in_one_line(ours, tmp_path, defect):
    change, message = BAD[defect]
    shutil.copytree(ours[0], tmp_path, dirs_exist_ok=True)
    rewrite(tmp_path, change)
    with pytest.raises(ValueError, match=message) as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_bad_folder_fails_in_one_line(ours, tmp_path):
    shutil.copytree(ours[0], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    rewrite(tmp_path, config=config | {"frobnication_depth": 3})
    with pytest.raises(ValueError, match="frobnication_depth") as err:
        load_checkpoint(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)
    rewrite(tmp_path, config=config)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_checkpoint(tmp_path / "nowhere")


def test_ignorable_tensors_are_skipped(ours, tmp_path):
    """DeepSeek-V3's multi-token-prediction layer (index num_layers, FP8 with scales) and rotary buffers."""
    path, cfg, params = ours
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    mtp = f"model.layers.{cfg.num_layers}"
    rewrite(tmp_path, lambda t: t | {f"{mtp}.eh_proj.weight": torch.zeros(4, 4, dtype=torch.float8_e4m3fn),
                                     f"{mtp}.eh_proj.weight_scale_inv": torch.ones(1, 1),
                                     f"{mtp}.enorm.weight": torch.ones(4),
                                     "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    _, loaded = load_checkpoint(tmp_path, dtype=F32)
    assert_same(named_tensors(cfg, loaded), named_tensors(cfg, params))
