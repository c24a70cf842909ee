"""Hugging Face safetensors checkpoints of DeepSeek-V3 / V2 / V2-Lite <-> (ModelConfig, ModelParams).

Dimension legend: V vocabulary, H hidden, Ld layers, E routed experts (logical), P_local this rank's physical
expert slots, I expert intermediate, S shared experts, b0 x b1 an FP8 scale block.

Loading reads config.json (hf_config.config_from_hf) and the tensors named in names.py from a single
model.safetensors.index.json with its shards, else model.safetensors, else every *.safetensors in the folder.
Names are checked before any tensor is read (every expected one present, nothing unexpected that is not
ignorable), each tensor's shape and dtype from its header just before its data: a bad checkpoint fails in
one line naming the tensor or field.
Under expert parallelism a rank reads only the experts of its local slots (Placement.local_slots), each
once even when replicated; others' expert tensors are never opened. FP8 weights (float8_e4m3fn with
'<name>_scale_inv') are dequantised to float32 on `device`, then cast; with fp8_experts the routed experts stay
FP8 (SwiGLUExpertsFP8, for the FP8 expert backends). Routers stay float32.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanomoe_fn.attention.params import MLAParams
from nanomoe_fn.decoder import DecoderParams
from nanomoe_fn.eplb.placement import Placement
from nanomoe_fn.model import names
from nanomoe_fn.model.config import ModelConfig
from nanomoe_fn.model.fp8 import DEFAULT_BLOCK, dequantize_blocks, quantize_blocks, scale_shape
from nanomoe_fn.model.hf_config import config_from_hf, config_to_hf
from nanomoe_fn.model.params import ModelParams
from nanomoe_fn.moe.params import GateParams, MoEParams, SharedMLP, SwiGLUExperts, SwiGLUExpertsFP8

CONFIG, INDEX, SINGLE = "config.json", "model.safetensors.index.json", "model.safetensors"
_FLOATS = ("F32", "F16", "BF16", "F64")  # safetensors dtype names a weight may have
_FP8 = "F8_E4M3"
Read = Callable[[str], torch.Tensor]  # tensor name -> the tensor in its load dtype, on the device


def read_config(path: str | Path) -> dict:
    """The checkpoint folder's config.json as a dict (FileNotFoundError naming the folder when absent)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {root}: no such folder")
    if not (root / CONFIG).is_file():
        raise FileNotFoundError(f"checkpoint {root}: no {CONFIG}")
    return json.loads((root / CONFIG).read_text())


class _Reader:
    """The checkpoint's tensors by name over its files; files open lazily, one handle each (on `stack`)."""

    def __init__(self, root: Path, block: tuple[int, int], stack: ExitStack) -> None:
        self.root, self.block, self.stack, self.handles = root, block, stack, {}
        if (root / INDEX).is_file():
            self.where = {n: root / f for n, f in json.loads((root / INDEX).read_text())["weight_map"].items()}
            for f in sorted(set(self.where.values())):
                if not f.is_file():
                    raise FileNotFoundError(f"checkpoint {root}: {INDEX} names shard {f.name!r}, which is missing")
        else:
            # model.safetensors alone when present (a folder may also hold other files' leftovers)
            files = [root / SINGLE] if (root / SINGLE).is_file() else sorted(root.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"checkpoint {root}: no *.safetensors files")
            self.where = {n: f for f in files for n in self._open(f).keys()}  # headers only

    def _open(self, f: Path) -> Any:  # safetensors' handle (its type is not importable)
        if f not in self.handles:
            self.handles[f] = self.stack.enter_context(safe_open(str(f), framework="pt"))
        return self.handles[f]

    def fail(self, what: str) -> ValueError:
        return ValueError(f"checkpoint {self.root}: {what}")

    def check_names(self, shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
        """Every expected name present; every other name ignorable or the FP8 scale of an expected one."""
        for n in shapes:
            if n not in self.where:
                raise self.fail(f"missing tensor {n!r}")
        for n in self.where:
            base = n[: -len(names.SCALE_SUFFIX)] if n.endswith(names.SCALE_SUFFIX) else n
            if base not in shapes and not names.is_ignored(n, cfg):
                raise self.fail(f"unexpected tensor {n!r} (not a tensor of this config's model)")

    def _slices(self, name: str, shape: tuple[int, ...]) -> tuple[Any, Any]:
        """(slice of `name`, slice of its FP8 scales or None); shape and dtypes checked from the headers."""
        sl = self._open(self.where[name]).get_slice(name)
        got, dt = tuple(sl.get_shape()), sl.get_dtype()
        if got != tuple(shape):
            raise self.fail(f"tensor {name!r} has shape {list(got)}, expected {list(shape)}")
        if dt != _FP8:
            if dt not in _FLOATS:
                raise self.fail(f"tensor {name!r} has dtype {dt}, expected one of {list(_FLOATS)} or {_FP8} with "
                                f"scales")
            return sl, None
        sname = name + names.SCALE_SUFFIX
        if sname not in self.where:
            raise self.fail(f"tensor {name!r} is {_FP8} without its scales {sname!r}")
        ssl = self._open(self.where[sname]).get_slice(sname)
        want = scale_shape(got, self.block) if len(got) == 2 else None
        if ssl.get_dtype() not in _FLOATS or tuple(ssl.get_shape()) != want:
            raise self.fail(f"tensor {sname!r} has dtype {ssl.get_dtype()} shape {ssl.get_shape()}, expected "
                            f"a float {list(want) if want else 'scale of a 2-D weight'} for blocks {self.block}")
        return sl, ssl

    def read(self, name: str, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
        """Tensor `name` on `device` in its float dtype (FP8: dequantised to float32)."""
        sl, ssl = self._slices(name, shape)
        if ssl is None:
            return sl[:].to(device)
        return dequantize_blocks(sl[:].to(device), ssl[:].to(device), self.block)

    def read_fp8(self, name: str, shape: tuple[int, ...], device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tensor `name` as (float8_e4m3fn [O, In], float32 block scales [Ob, Ib]) on `device`: an FP8 tensor
        as stored, a bf16/fp16/fp32 one block-quantised here (the same scheme)."""
        sl, ssl = self._slices(name, shape)
        if ssl is None:
            return quantize_blocks(sl[:].to(device).float(), self.block)
        return sl[:].to(device), ssl[:].to(device).float()


def _swiglu(read: Read, i: int, shared: bool) -> SharedMLP:
    """Layer i's shared experts / dense FFN fused: w13 = gate rows then up rows [2*S*I, H], w2 = down [H, S*I]."""
    gate, up, down = (read(names.mlp_name(i, p, shared)) for p in names.SWIGLU)
    return SharedMLP(w13=torch.cat([gate, up]), w2=down)


def _experts(read: Read, cfg: ModelConfig, i: int, slots: list[int], dtype: torch.dtype,
             device: torch.device | str) -> SwiGLUExperts:
    """Layer i's experts of `slots` (logical ids per local slot) stacked: w13 [P_local, 2I, H], w2 [P_local, H, I];
    a replica copies its expert's first slot instead of reading the tensors again."""
    H, I_ = cfg.hidden, cfg.moe.intermediate
    w13 = torch.empty(len(slots), 2 * I_, H, dtype=dtype, device=device)
    w2 = torch.empty(len(slots), H, I_, dtype=dtype, device=device)
    first: dict[int, int] = {}
    for j, e in enumerate(slots):
        if e in first:
            w13[j], w2[j] = w13[first[e]], w2[first[e]]
            continue
        first[e] = j
        w13[j, :I_] = read(names.expert_name(i, e, "gate_proj"))
        w13[j, I_:] = read(names.expert_name(i, e, "up_proj"))
        w2[j] = read(names.expert_name(i, e, "down_proj"))
    return SwiGLUExperts(w13=w13, w2=w2)


def _experts_fp8(rd: _Reader, shapes: dict, cfg: ModelConfig, i: int, slots: list[int],
                 device: torch.device | str) -> SwiGLUExpertsFP8:
    """Layer i's experts of `slots` kept in block-scaled FP8 (moe/params.py's record): gate and up stacked into
    w13 [P_local, 2I, H] with their scales [P_local, 2 * Ib, Hb] (gate blocks, then up blocks), down in w2."""
    per: dict[int, tuple[torch.Tensor, ...]] = {}
    for e in dict.fromkeys(slots):  # each expert read once, replicas share its tensors' values
        gate, up, down = (rd.read_fp8(n, shapes[n], device) for n in
                          (names.expert_name(i, e, p) for p in ("gate_proj", "up_proj", "down_proj")))
        per[e] = (torch.cat((gate[0].view(torch.uint8), up[0].view(torch.uint8))).view(gate[0].dtype),
                  torch.cat((gate[1], up[1])), *down)
    if not slots:  # a rank with no expert slots: empty tensors of the record's shapes
        H, I_, (b0, b1) = cfg.hidden, cfg.moe.intermediate, rd.block
        fp8, f32 = torch.float8_e4m3fn, torch.float32
        return SwiGLUExpertsFP8(torch.empty((0, 2 * I_, H), dtype=fp8, device=device),
                                torch.empty((0, 2 * -(-I_ // b0), -(-H // b1)), dtype=f32, device=device),
                                torch.empty((0, H, I_), dtype=fp8, device=device),
                                torch.empty((0, -(-H // b0), -(-I_ // b1)), dtype=f32, device=device), rd.block)
    return SwiGLUExpertsFP8(*(torch.stack([per[e][f] for e in slots]) for f in range(4)), block=rd.block)


def load_params(path: str | Path, cfg: ModelConfig, *, dtype: torch.dtype = torch.bfloat16,
                device: torch.device | str = "cpu", placement: Placement | None = None, rank: int = 0,
                block: tuple[int, int] = DEFAULT_BLOCK, fp8_experts: bool = False) -> ModelParams:
    """The tensors of the checkpoint at `path` for a given config (load_checkpoint reads the config too):
    everything in `dtype` on `device` but the routers (float32); MoE layers hold `rank`'s experts under
    `placement` (default all E in order). block: the FP8 scale block (b0, b1). fp8_experts: the routed
    experts stay block-scaled FP8 (SwiGLUExpertsFP8, for the FP8 expert backends): FP8 tensors as stored,
    others quantised at load; everything else is dequantised to `dtype` as usual."""
    root = Path(path)
    E = cfg.moe.num_experts
    if placement is not None and placement.num_logical != E:
        raise ValueError(f"placement has {placement.num_logical} logical experts, the checkpoint's config {E}")
    slots = list(range(E)) if placement is None else placement.local_slots(rank).tolist()
    shapes = names.model_shapes(cfg)
    with ExitStack() as stack:
        rd = _Reader(root, tuple(block), stack)
        rd.check_names(shapes, cfg)

        def read(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            return rd.read(name, shapes[name], device).to(as_dtype)

        mla_fields = names.mla_shapes(cfg)
        embed, layers = read(names.EMBED), []
        for i in range(cfg.num_layers):
            attn = MLAParams(**{f: None if s is None else read(names.attn_name(i, f)) for f, s in mla_fields.items()})
            norms = read(names.layer(i, names.ATTN_NORM)), read(names.layer(i, names.FFN_NORM))
            if not cfg.is_moe_layer(i):
                layers.append(DecoderParams(norms[0], attn, norms[1], dense=_swiglu(read, i, shared=False)))
                continue
            bias = read(names.layer(i, names.ROUTER_BIAS), torch.float32) if cfg.moe.correction_bias else None
            if bias is not None and not bool(torch.isfinite(bias).all()):  # route never checks it: it only picks
                raise rd.fail(f"'{names.layer(i, names.ROUTER_BIAS)}' holds NaN/inf (the router's correction "
                              f"bias picks the experts: it must be finite)")
            gate = GateParams(read(names.layer(i, names.ROUTER_WEIGHT), torch.float32), bias)
            shared = _swiglu(read, i, shared=True) if cfg.moe.n_shared_experts else None
            experts = (_experts_fp8(rd, shapes, cfg, i, slots, device) if fp8_experts
                       else _experts(read, cfg, i, slots, dtype, device))
            moe = MoEParams(gate, experts, shared)
            layers.append(DecoderParams(norms[0], attn, norms[1], moe=moe))
        norm = read(names.NORM)
        lm_head = embed if cfg.tie_word_embeddings else read(names.LM_HEAD)
    return ModelParams(embed=embed, layers=tuple(layers), norm=norm, lm_head=lm_head)


def read_model_config(path: str | Path) -> ModelConfig:
    """The checkpoint folder's config.json as a ModelConfig (errors name the folder, config.json and the field);
    e.g. to size a placement before load_checkpoint."""
    root = Path(path)
    try:
        return config_from_hf(read_config(root))
    except (ValueError, TypeError) as e:
        raise ValueError(f"checkpoint {root}: {e}") from e  # e names config.json and the field


def load_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                    placement: Placement | None = None, rank: int = 0,
                    fp8_experts: bool = False) -> tuple[ModelConfig, ModelParams]:
    """A Hugging Face DeepSeek-V3 / V2 / V2-Lite checkpoint folder -> (config, params) (module docstring);
    with `placement`, MoE layers hold only `rank`'s local slots' experts; fp8_experts keeps the routed experts
    in block-scaled FP8 (load_params)."""
    root = Path(path)
    raw = read_config(root)
    cfg = read_model_config(root)
    block = tuple((raw.get("quantization_config") or {}).get("weight_block_size", DEFAULT_BLOCK))
    return cfg, load_params(root, cfg, dtype=dtype, device=device, placement=placement, rank=rank, block=block,
                            fp8_experts=fp8_experts)


def named_tensors(cfg: ModelConfig, params: ModelParams) -> dict[str, torch.Tensor]:
    """params under DeepSeek's tensor names (views: expert e's gate/up/down are rows of w13 / w2);
    params must hold every expert in logical order (not an expert-parallel shard)."""
    if len(params.layers) != cfg.num_layers:
        raise ValueError(f"params have {len(params.layers)} layers, the config {cfg.num_layers}")
    out = {names.EMBED: params.embed, names.NORM: params.norm}
    if not cfg.tie_word_embeddings:
        out[names.LM_HEAD] = params.lm_head
    for i, lp in enumerate(params.layers):
        out[names.layer(i, names.ATTN_NORM)], out[names.layer(i, names.FFN_NORM)] = lp.attn_norm, lp.ffn_norm
        out |= {names.attn_name(i, f): getattr(lp.attn, f) for f, s in names.mla_shapes(cfg).items() if s is not None}
        mlps = [(lp.dense, False)] if lp.moe is None else [(lp.moe.shared, True)]
        if lp.moe is not None:
            n, E = lp.moe.experts.num_experts, cfg.moe.num_experts
            if n != E:
                raise ValueError(f"layer {i} holds {n} of {E} experts (an expert-parallel shard); save params "
                                 f"that hold every expert (load without a placement)")
            out[names.layer(i, names.ROUTER_WEIGHT)] = lp.moe.gate.weight
            if lp.moe.gate.bias is not None:
                out[names.layer(i, names.ROUTER_BIAS)] = lp.moe.gate.bias
            w13, w2, I_ = lp.moe.experts.w13, lp.moe.experts.w2, cfg.moe.intermediate
            for e in range(E):
                out |= {names.expert_name(i, e, "gate_proj"): w13[e, :I_],
                        names.expert_name(i, e, "up_proj"): w13[e, I_:], names.expert_name(i, e, "down_proj"): w2[e]}
        for mlp, shared in mlps:
            if mlp is not None:  # w13 = gate rows then up rows
                gate, up = mlp.w13.chunk(2)
                out |= {names.mlp_name(i, p, shared): t for p, t in zip(names.SWIGLU, (gate, up, mlp.w2))}
    return out


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write `tensors` as model.safetensors, or as model-0000k-of-0000n.safetensors shards of at most
    max_shard_bytes each (a bigger tensor gets a shard of its own) with model.safetensors.index.json.
    Returns the file names written."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for n, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files = [SINGLE] if len(shards) == 1 else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for k in range(len(shards))]
    for f, shard in zip(files, shards):
        # copies on the CPU: views of one buffer (w13's gate and up rows) may not share storage in a file
        save_file({n: tensors[n].detach().to("cpu", copy=True).contiguous() for n in shard}, str(root / f),
                  metadata={"format": "pt"})
    if len(files) == 1:
        (root / INDEX).unlink(missing_ok=True)  # an earlier sharded save's index would shadow the new file
    else:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {n: f for f, shard in zip(files, shards) for n in shard}
        (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files


def save_checkpoint(path: str | Path, cfg: ModelConfig, params: ModelParams, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json (hf_config.config_to_hf) and the weights under DeepSeek's names, sharded with an
    index past max_shard_bytes; refuses params holding only some experts (an expert-parallel shard)."""
    tensors = named_tensors(cfg, params)
    save_tensors(path, tensors, max_shard_bytes)
    (Path(path) / CONFIG).write_text(json.dumps(config_to_hf(cfg), indent=2))
