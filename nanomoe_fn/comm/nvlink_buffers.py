"""The `nvlink` comm's options and symmetric buffers: what NvlinkComm checks before it builds anything, the
shapes of the buffers every rank allocates, and their peer mappings.

Dimension legend: T_max tokens a rank may send, H hidden, k experts per token, W ranks, P_local slots per
rank, U = W * T_max received-token rows, RB bytes of a packed FP8 row (kernels/fp8_pack.py).

Buffers (the same on every rank, torch symmetric memory): "tok" [U, H] in the comm's dtype, or packed FP8
rows uint8 [U, RB] with dispatch_dtype float8_e4m3fn; "meta" [U, k] int32 pair codes; "w" [U, k] float32
weights; "cnt" [W, P_local + 1] int64 count rows; "flag" [2, W] int64 arrival flags (dispatch, combine);
"comb" [W, T_max, H] partial sums of combine, always in the comm's dtype (FP8 expert backends output it).
Pure option checks here import nothing GPU-side, so they are tested on the CPU (tests/test_fp8_pack.py).
"""

from __future__ import annotations

from typing import Any

import torch

MODES = {"decode": "masked", "prefill": "gathered"}
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8 = torch.float8_e4m3fn
FP8_GROUP = 128  # channels per scale of a packed FP8 row


def option_reason(**options: Any) -> str:
    """Why these NvlinkComm options are invalid ("" when they are fine); nothing about the machine."""
    mode = options.get("mode", "decode")
    if mode not in MODES:
        return f"mode must be one of {sorted(MODES)}, got {mode!r}"
    dtype = options.get("dtype", torch.bfloat16)
    if dtype not in DTYPES:
        return f"dtype must be one of {[str(d) for d in DTYPES]}, got {dtype}"
    for name in ("max_tokens", "hidden", "top_k", "num_slots"):
        v = options.get(name, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            return f"{name} must be a positive int, got {v!r}"
    if not options.get("timeout_s", 60.0) > 0:
        return f"timeout_s must be > 0, got {options.get('timeout_s')}"
    wire = options.get("dispatch_dtype")
    if wire is not None and wire not in (dtype, FP8):
        return (f"dispatch_dtype must be None (rows move in dtype), {dtype} or {FP8} (packed FP8 rows), "
                f"got {wire}")
    if wire == FP8 and options.get("hidden", FP8_GROUP) % FP8_GROUP:
        return (f"FP8 dispatch quantises per {FP8_GROUP} channels: hidden must be a multiple of {FP8_GROUP}, "
                f"got {options.get('hidden')}")
    return ""


def buffer_shapes(W: int, t_max: int, hidden: int, top_k: int, P_local: int, dtype: torch.dtype,
                  fp8: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every symmetric buffer (module docstring)."""
    from nanomoe_kernels.fp8_pack import packed_row_bytes

    tok = ((W * t_max, packed_row_bytes(hidden)), torch.uint8) if fp8 else ((W * t_max, hidden), dtype)
    return {"tok": tok, "meta": ((W * t_max, top_k), torch.int32), "w": ((W * t_max, top_k), torch.float32),
            "cnt": ((W, P_local + 1), torch.int64), "flag": ((2, W), torch.int64),
            "comb": ((W, t_max, hidden), dtype)}


def map_symmetric(shapes: dict, group: Any, rank: int, W: int, device: torch.device) -> tuple[list, dict]:
    """Allocate each buffer in symmetric memory (zeroed) and map every rank's copy: (rendezvous handles,
    {name: (this rank's buffer, delta [W] int64: element offsets to each rank's copy)}). A collective: every
    rank calls it with the same shapes. uint8 buffers (packed FP8 rows) must lie a multiple of 16 bytes from
    their peers' (ep_nvlink's put kernel stores 16-byte vectors there)."""
    import torch.distributed._symmetric_memory as symm_mem

    local = {n: symm_mem.empty(*s, dtype=dt, device=device).zero_() for n, (s, dt) in shapes.items()}
    torch.cuda.synchronize(device)  # flags and counts are zero before any peer can write them
    handles, bufs = [], {}
    for n, t in local.items():
        try:
            hdl = symm_mem.rendezvous(t, group.group_name)
        except Exception as err:  # noqa: BLE001 - any failure here means no peer mapping
            raise RuntimeError(f"rank {rank}: the nvlink comm could not map its peers' buffers (all ranks "
                               f"must be GPUs of one host with peer access): {err}") from err
        ptrs = [hdl.get_buffer(r, list(t.shape), t.dtype).data_ptr() for r in range(W)]
        align = 16 if t.dtype == torch.uint8 else t.element_size()  # packed FP8 rows: 16-byte vector stores
        if any((p - t.data_ptr()) % align for p in ptrs):
            raise RuntimeError(f"rank {rank}: peer buffer '{n}' is not {align}-byte aligned to this rank's")
        delta = torch.tensor([(p - t.data_ptr()) // t.element_size() for p in ptrs], dtype=torch.int64,
                             device=device)
        handles.append(hdl)
        bufs[n] = (t, delta)
    return handles, bufs
