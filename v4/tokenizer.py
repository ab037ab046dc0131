"""Text <-> ids. A checkpoint's tokenizer.json goes through the `tokenizers` library; our own
small configs (no tokenizer.json) use a byte-level tokenizer: id = byte + 3 (0 bos, 1 eos, 2 pad).

Both read V4's BOS and EOS strings in a text as those tokens (the chat format writes BOS as text),
as the `tokenizers` library does for a checkpoint's added tokens."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import ConfigError


BOS_TEXT, EOS_TEXT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


class ByteTokenizer:
    OFFSET = 3
    name = "byte-level"

    def __init__(self, vocab_size: int, bos: int = 0, eos: int = 1):
        if vocab_size < 256 + self.OFFSET:
            raise ConfigError(
                f"the byte-level tokenizer needs vocab_size >= {256 + self.OFFSET}, the model has {vocab_size}; "
                "ship a tokenizer.json with the checkpoint"
            )
        self.bos, self.eos = bos, eos
        self._special = {BOS_TEXT: bos, EOS_TEXT: eos}
        self._split = re.compile("(" + "|".join(map(re.escape, self._special)) + ")")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos] if add_bos else []
        for part in self._split.split(text):
            if part in self._special:
                ids.append(self._special[part])
            else:
                ids.extend(b + self.OFFSET for b in part.encode("utf-8"))
        return ids

    def decode(self, ids) -> str:
        return bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET).decode(
            "utf-8", errors="replace"
        )


class HFTokenizer:
    name = "tokenizer.json"

    def __init__(self, path: Path, bos: int):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path}: cannot read tokenizer ({e}); check the file or remove it to use ids") from None
        self.bos = bos

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos] if add_bos else []) + ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def load_tokenizer(cfg, checkpoint: str | Path | None = None):
    if checkpoint is not None and (Path(checkpoint) / "tokenizer.json").is_file():
        return HFTokenizer(Path(checkpoint) / "tokenizer.json", cfg.bos_token_id)
    return ByteTokenizer(cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id)
