"""The whole model against transformers' own DeepSeek-V3 and V2 implementations (float32, tiny configs):
logits of prefill and of every decode step, greedy generation token for token; and generation's own
properties (a batch of prompts of different lengths, paged caches, sampling, stop tokens, bad input).

The transformers models are converted in memory (from_transformers.params_from_hf, config_from_hf on their
config); tests/test_checkpoint.py covers the same models through save_pretrained and load_checkpoint.
"""

from __future__ import annotations

import pytest
import torch

from nanomoe_fn.model.config import model_preset
from nanomoe_fn.model.forward import ModelContext, init_caches, model_forward
from nanomoe_fn.model.from_transformers import params_from_hf
from nanomoe_fn.model.generate import generate
from nanomoe_fn.model.hf_config import config_from_hf
from nanomoe_fn.model.params import init_model_params
from nanomoe_fn.model.sampling import SamplingConfig, sample
from tests.hf_models import tiny_v2_lite, tiny_v3

pytest.importorskip("transformers")

MODELS = {
    "v3_bias": lambda: tiny_v3("random"),
    "v3_zero_bias": lambda: tiny_v3("zero", seed=1),
    "v3_rope_default": lambda: tiny_v3("random", seed=2, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": 10000.0}),
    "v2_lite": lambda: tiny_v2_lite(),
    "v2_group_limited": lambda: tiny_v2_lite(seed=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                             q_lora_rank=16, norm_topk_prob=False, routed_scaling_factor=2.0),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def ours(model):
    cfg = config_from_hf(model.config.to_dict())
    return cfg, params_from_hf(model, cfg)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("paged", [False, True])
def test_logits_match_transformers(name, paged):
    model = MODELS[name]()
    cfg, params = ours(model)
    ctx = ModelContext(cfg)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (3, 14), generator=gen)
    with torch.no_grad():
        want = model(ids).logits
    caches = init_caches(cfg, 3, 32, torch.float32, paged=paged)
    got, caches = model_forward(params, ids[:, :10], torch.arange(10).expand(3, 10), caches, ctx)
    assert rel(got, want[:, :10]) < 1e-4
    for t in range(10, 14):  # the decode path (weight-absorbed attention over the cache), one step at a time
        step, caches = model_forward(params, ids[:, t:t + 1], torch.full((3, 1), t), caches, ctx)
        assert rel(step[:, 0], want[:, t]) < 1e-4, f"decode step {t}"


@pytest.mark.parametrize("name", ["v3_bias", "v3_zero_bias", "v2_lite"])
def test_greedy_tokens_match_transformers_generate(name):
    model = MODELS[name]()
    cfg, params = ours(model)
    ids = torch.randint(2, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(params, [ids[0].tolist()], ModelContext(cfg), SamplingConfig(max_new_tokens=32, ignore_eos=True))
    assert got[0] == want[0, 9:].tolist()
    assert len(set(got[0])) > 4  # a real sequence, not one token repeated


def tiny():
    cfg = model_preset("tiny")
    return cfg, init_model_params(cfg, torch.float32, seed=3), ModelContext(model_preset("tiny"))


@pytest.mark.parametrize("paged", [False, True])
def test_batch_of_prompts_equals_each_alone(paged):
    cfg, params, ctx = tiny()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    s = SamplingConfig(max_new_tokens=10, ignore_eos=True)
    together = generate(params, prompts, ctx, s, paged=paged)
    assert together == [generate(params, [p], ctx, s)[0] for p in prompts]
    assert all(len(o) == 10 for o in together)


def test_sampling_seeded_and_bounded():
    cfg, params, ctx = tiny()
    prompts = [[5, 6, 7], [8, 9]]
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=11, ignore_eos=True)
    a, b = generate(params, prompts, ctx, s), generate(params, prompts, ctx, s)
    assert a == b
    assert a != generate(params, prompts, ctx, SamplingConfig(max_new_tokens=12, temperature=1.0, seed=12,
                                                                ignore_eos=True))
    greedy = generate(params, prompts, ctx, SamplingConfig(max_new_tokens=12, ignore_eos=True))
    assert generate(params, prompts, ctx, SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=1,
                                                         ignore_eos=True)) == greedy
    assert generate(params, prompts, ctx, SamplingConfig(max_new_tokens=12, temperature=0.7, top_p=1e-6,
                                                         ignore_eos=True)) == greedy


def test_sample_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(logits, SamplingConfig(temperature=1.0), gen), minlength=4) / 20000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015)
    top2 = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_k=2), gen), minlength=4) / 20000
    assert top2[2:].sum() == 0 and abs(float(top2[0]) - 0.625) < 0.015
    nucleus = torch.bincount(sample(logits, SamplingConfig(temperature=1.0, top_p=0.7), gen), minlength=4) / 20000
    assert nucleus[2:].sum() == 0 and abs(float(nucleus[0]) - 0.625) < 0.015  # 0.5 + 0.3 reach 0.7


def test_stop_tokens_end_each_sequence():
    cfg, params, ctx = tiny()
    prompts = [[5, 6, 7], [8, 9]]
    free = generate(params, prompts, ctx, SamplingConfig(max_new_tokens=12, ignore_eos=True))
    stop = free[0][4]
    got = generate(params, prompts, ctx, SamplingConfig(max_new_tokens=12, stop_tokens=(stop,), ignore_eos=True))
    for f, g in zip(free, got):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert g == f[:cut]
    assert len(got[0]) == free[0].index(stop) + 1 <= 5


def test_bad_prompts_are_refused():
    cfg, params, ctx = tiny()
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(params, [[1], []], ctx)
    with pytest.raises(ValueError, match=r"prompts\[0\] holds 999"):
        generate(params, [[5, 999]], ctx)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(params, [[5] * 500], ctx, SamplingConfig(max_new_tokens=100))
    with pytest.raises(ValueError, match="cuda_graph"):
        generate(params, [[5]], ctx, cuda_graph=True)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=1.5)


def test_compiled_decode_equals_eager():
    cfg, params, ctx = tiny()
    prompts = [[5, 6, 7], [8, 9]]
    s = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    assert generate(params, prompts, ctx, s, compile=True) == generate(params, prompts, ctx, s)
