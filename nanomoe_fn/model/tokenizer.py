"""Text <-> token ids through a checkpoint's own tokenizer (the `tokenizers` library reading tokenizer.json).

Dimension legend: n tokens of one text.

tokenizer_config.json, when present, names the bos and eos tokens (a string, or an AddedToken dict with
"content"); generation_config.json's eos_token_id (an int or a list) adds stop ids. The BOS is added here,
never by tokenizer.json's post-processor (DeepSeek's adds one too), so `add_bos` alone decides it.
No chat template: prompts are plain text.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

TOKENIZER_JSON, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


class Tokenizer:
    """A checkpoint's tokenizer: encode / decode, bos_token_id (None when unknown), eos_token_ids."""

    def __init__(self, tok: _HFTokenizer, bos_token_id: int | None, eos_token_ids: tuple[int, ...]) -> None:
        self.tok, self.bos_token_id, self.eos_token_ids = tok, bos_token_id, eos_token_ids

    @property
    def vocab_size(self) -> int:
        """Ids in the vocabulary, added tokens included."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """text -> ids [n], with the BOS first when add_bos and the tokenizer has one."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """ids -> text (special tokens such as BOS / EOS left out unless skip_special_tokens=False)."""
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_id(tok: _HFTokenizer, entry: object, where: str) -> int | None:
    """The id of a tokenizer_config token entry (a string or {"content": ...}); None for an absent entry."""
    content = entry.get("content") if isinstance(entry, dict) else entry
    if content is None:
        return None
    tid = tok.token_to_id(content)
    if tid is None:
        raise ValueError(f"{where}: token {content!r} is not in the tokenizer's vocabulary")
    return tid


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of the checkpoint folder `path` (FileNotFoundError when it has no tokenizer.json)."""
    root = Path(path)
    if not (root / TOKENIZER_JSON).is_file():
        raise FileNotFoundError(f"checkpoint {root}: no {TOKENIZER_JSON} (the tokenizer is read from it)")
    tok = _HFTokenizer.from_file(str(root / TOKENIZER_JSON))
    conf = _read_json(root / TOKENIZER_CONFIG)
    where = str(root / TOKENIZER_CONFIG)
    bos = _token_id(tok, conf.get("bos_token"), where)
    if conf.get("add_bos_token") is False:  # the checkpoint asks for no BOS
        bos = None
    eos = [] if (e := _token_id(tok, conf.get("eos_token"), where)) is None else [e]
    gen = _read_json(root / GENERATION_CONFIG).get("eos_token_id")
    for t in gen if isinstance(gen, list) else [] if gen is None else [gen]:
        if t not in eos:
            eos.append(int(t))
    return Tokenizer(tok, bos, tuple(eos))
