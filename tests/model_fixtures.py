"""Tiny checkpoints and tokenizers in tmp folders for the checkpoint and tokenizer tests (nothing downloaded).

Dimension legend: E experts, I expert intermediate, H hidden, b0 x b1 an FP8 block.

hf_tensors: a transformers model's weights under the checkpoint's names, experts split per expert by
slicing transformers' fused gate_up_proj [E, 2I, H] / down_proj [E, H, I] (written out here, not through
nanomoe_fn's names.py, so the loader is checked against an independent mapping).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_FUSED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def hf_tensors(model: Any) -> dict[str, torch.Tensor]:
    """A transformers DeepSeek-V3/V2 model's state dict under the safetensors names (per-expert tensors)."""
    out = {}
    for name, t in model.state_dict().items():
        m = _FUSED.match(name)
        if not m:
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
            else:
                gate, up = t[e].chunk(2)
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = gate
                out[f"{m.group(1)}.{e}.up_proj.weight"] = up
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def rewrite(path: Path, change: Any = None, config: dict | None = None) -> None:
    """Rewrite a single-file checkpoint: tensors = change(tensors) when given; config.json = config when given."""
    if change is not None:
        f = path / "model.safetensors"
        tensors = change({n: t.clone() for n, t in load_file(str(f)).items()})
        save_file(tensors, str(f), metadata={"format": "pt"})
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, In] -> (float8_e4m3fn [O, In], scale_inv [ceil(O/b0), ceil(In/b1)] float32), block by block:
    each block divided by max|block| / 448 (written with loops, independent of nanomoe_fn/model/fp8.py)."""
    O, In = w.shape
    nb0, nb1 = -(-O // block[0]), -(-In // block[1])
    q = torch.empty(O, In, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nb0, nb1, dtype=torch.float32)
    for a in range(nb0):
        for b in range(nb1):
            rows, cols = slice(a * block[0], (a + 1) * block[0]), slice(b * block[1], (b + 1) * block[1])
            blk = w[rows, cols].float()
            s = float(blk.abs().max()) / 448.0 or 1.0
            scale[a, b] = s
            q[rows, cols] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """The reference dequantisation, block by block: float32(q) * scale of its block."""
    out = q.float()
    for a in range(scale.shape[0]):
        for b in range(scale.shape[1]):
            out[a * block[0]:(a + 1) * block[0], b * block[1]:(b + 1) * block[1]] *= scale[a, b]
    return out


def tiny_tokenizer(path: Path, bos: str | dict = "<s>", eos: str = "</s>", config: bool = True) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, saved as path/tokenizer.json, with a
    tokenizer_config.json naming bos / eos (when config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world, hello experts",
            "mixture of experts routes each token to a few experts"] * 4
    tok.train_from_iterator(text, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    if config:
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos,
                                                                "add_bos_token": True}))
    return path
