"""Command-line helpers for programs built on the package (the `nanomoe` command, the benches): one-line
usage errors, and the checks of `nanomoe generate`'s flags.

A flag mistake is raised as `UsageError(message)` anywhere below a program's main(); `run_cli` turns it
into `prog: error: <message>` on stderr and exit status 2, as argparse does for its own errors.
`OneLineParser` makes argparse's own errors one line too; `parse_device` reads a --device flag;
`check_generate_args` refuses `nanomoe generate` flags that cannot run, naming the flag, before any load.
"""

from __future__ import annotations

import argparse
import re
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


class UsageError(SystemExit):
    """A command-line mistake, raised with its one-line message. `run_cli` prints it as argparse does
    (`prog: error: ...`) and exits with status 2, no traceback; uncaught elsewhere it is still a
    SystemExit that prints the message (status 1). str(err) is the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def run_cli(main: Callable[[], object], prog: str) -> None:
    """Run a program's main() as a command: a UsageError becomes `prog: error: <message>` on stderr and
    exit status 2 (as argparse's own errors)."""
    try:
        main()
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (a bad value, an unknown or missing flag) are one stderr line,
    `prog: error: <message> (see <prog sub> --help)`, exit status 2, instead of the usage block first.
    Its subparsers are OneLineParsers too (add_subparsers builds them with the parser's own class)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see {self.prog} --help)\n")


def parse_device(text: str, flag: str = "--device") -> Any:
    """'cpu', 'cuda' or 'cuda:i' -> a torch.device that exists on this machine (index None for a bare
    'cuda'); else UsageError naming `flag` (an unknown name, no CUDA device, an index past the last)."""
    import torch

    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text.strip())
    if m is None or (m[1] == "cpu" and m[2] is not None):
        raise UsageError(f"{flag}: expected cpu or cuda[:i], got {text!r}")
    if m[1] == "cpu":
        return torch.device("cpu")
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise UsageError(f"{flag} {text}: this machine has no CUDA device (torch.cuda.is_available() is False); "
                         f"use {flag} cpu")
    if m[2] is not None and int(m[2]) >= have:
        raise UsageError(f"{flag} {text}: this machine has {have} CUDA device(s), cuda:0 to cuda:{have - 1}")
    return torch.device("cuda", int(m[2])) if m[2] is not None else torch.device("cuda")


class ByteTokenizer:
    """UTF-8 bytes as token ids (the random tiny preset's 256-token vocabulary; no checkpoint tokenizer)."""

    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """text -> its UTF-8 bytes."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """ids (bytes) -> text; invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                  "top_p": "--top-p", "seed": "--seed", "stop_tokens": "--stop"}


def rank_device(a: Namespace, rank: int, world: int) -> Any:
    """This rank's torch.device: --device (cuda:i on one rank), else cuda when available; rank r of several
    takes cuda:(r % the GPUs)."""
    import torch

    dev = parse_device(a.device) if a.device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and (dev.index is None or world > 1):
        dev = torch.device("cuda", rank % torch.cuda.device_count())
    return dev


def backend_names(a: Namespace, cuda: bool) -> tuple[str, str]:
    """(attention, expert) backend names: the flags, else triton on CUDA, torch / bmm elsewhere."""
    return a.attn_backend or ("triton" if cuda else "torch"), a.expert_backend or ("triton" if cuda else "bmm")


def use_cuda_graph(a: Namespace, cuda: bool) -> bool:
    """--cuda-graph / --no-cuda-graph when given; else on for a CUDA device whose expert backend is capturable
    (triton, deepgemm and the FP8 backends): one graph replay a decode step, 6.4x the eager step at batch 1 on
    the 4-layer V3 preset (bench/results/model_notes.md)."""
    from nanomoe_fn.moe.experts import capturable_backends

    if a.cuda_graph is not None:
        return bool(a.cuda_graph)
    return cuda and backend_names(a, cuda)[1] in capturable_backends()


def check_cuda_graph(a: Namespace, device: Any) -> None:
    """An explicit --cuda-graph that cannot run: off CUDA, or with an expert backend that reads counts on the
    host (ValueError naming the flag; the default just stays eager there)."""
    from nanomoe_fn.moe.experts import EXPERT_BACKENDS, capturable_backends

    if not a.cuda_graph:
        return
    if device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device (this run is on {device}); leave it out on the CPU")
    name = backend_names(a, True)[1]
    if name in EXPERT_BACKENDS and name not in capturable_backends():  # an unknown name: --expert-backend's error
        raise ValueError(f"--cuda-graph: expert backend {name!r} reads expert counts on the host, so its decode "
                         f"step cannot be captured; use one of {capturable_backends()} or --no-cuda-graph")


def check_generate_args(a: Namespace, rank: int = 0, world: int = 1) -> None:
    """Refuse what cannot run before anything loads or spawns: a ValueError naming the flag. rank / world:
    this process's (torchrun); a parent about to spawn --nproc ranks on GPUs checks the backend names only,
    touching no GPU (each rank checks its own)."""
    import torch

    from nanomoe_fn.attention.backends import MLA_BACKENDS, get_mla_backend
    from nanomoe_fn.model.config import model_preset
    from nanomoe_fn.model.sampling import SamplingConfig
    from nanomoe_fn.moe.experts import EXPERT_BACKENDS, get_expert_backend

    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {a.nproc}")
    if a.checkpoint is not None and not Path(a.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {a.checkpoint}: not a folder")
    device = rank_device(a, rank, world)
    if a.nproc > 1 and a.device is not None and ":" in a.device:
        raise ValueError(f"--device {a.device} picks one GPU; with --nproc {a.nproc} rank r takes cuda:r "
                         f"(pass --device cuda)")
    if device.type == "cuda" and a.nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {a.nproc} needs {a.nproc} CUDA devices, this machine has "
                         f"{torch.cuda.device_count()}")
    try:
        SamplingConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       seed=a.seed, stop_tokens=tuple(a.stop), ignore_eos=a.ignore_eos)
    except (TypeError, ValueError) as err:
        msg = str(err)
        for field, flag in SAMPLING_FLAGS.items():
            msg = msg.replace(f"SamplingConfig.{field}", flag)
        raise ValueError(msg) from None
    if a.checkpoint is None:
        try:
            cfg = model_preset(a.preset)
        except ValueError as err:
            raise ValueError(f"--preset: {err}") from None
    else:
        from nanomoe_fn.model.checkpoint import read_model_config

        cfg = read_model_config(a.checkpoint)
    if cfg.moe.num_experts % a.nproc:
        raise ValueError(f"--nproc {a.nproc} must divide the model's {cfg.moe.num_experts} routed experts (each "
                         f"rank holds an equal share)")
    if any(t >= cfg.vocab_size for t in a.stop):
        raise ValueError(f"--stop {max(a.stop)} is not a token id of this model (vocab_size={cfg.vocab_size})")
    attn, experts = backend_names(a, device.type == "cuda")
    check_cuda_graph(a, device)
    for flag, pick, known, name, sub in (("--attn-backend", get_mla_backend, MLA_BACKENDS, attn, cfg.mla),
                                         ("--expert-backend", get_expert_backend, EXPERT_BACKENDS, experts, cfg.moe)):
        try:
            if name not in known or device.type != "cuda" or a.nproc == 1:  # else the spawned ranks check
                pick(name, sub, device)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
    tok = tokenizer_of(a)
    lengths = [len(tok.encode(t)) for t in a.prompt or ["Hello"]]
    if 0 in lengths:
        raise ValueError(f"--prompt #{lengths.index(0) + 1} is empty: every prompt needs at least one token")
    if max(lengths) + a.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: the longest prompt ({max(lengths)} tokens) plus "
                         f"the new tokens exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")


def tokenizer_of(a: Namespace) -> Any:
    """The checkpoint's tokenizer, or byte tokens for a random model."""
    if a.checkpoint is None:
        return ByteTokenizer()
    from nanomoe_fn.model.tokenizer import load_tokenizer

    return load_tokenizer(a.checkpoint)
