"""A stand-in tokenizer and text generator with the shape of a SentencePiece model.

Pieces are words and punctuation with a leading space, as llama.cpp's tokenizer gives them, so
prompt token counts land close to the real server's ("Hello, my name is" is 6 tokens with BOS,
as in the capture). Ids are stable across processes, so prompt caches and /tokenize agree.
"""

from __future__ import annotations

import random
import re
import zlib

N_VOCAB = 32000
BOS_ID, EOS_ID = 1, 2
BOS_PIECE = "<s>"
_PIECE = re.compile(r" ?[^\W_]+| ?[^\w\s]|\s+", re.UNICODE)
_FIRST_FREE_ID = 259  # below this SentencePiece keeps bytes and control tokens

_id_to_piece: dict[int, str] = {}

# Generated text draws from pieces seen in the recorded answers: multilingual, odd, honest to a
# random-weight model, and all of them single tokens.
VOCAB = [
    " moves", " Atlantic", " Unit", " много", " gau", " sorte", " Lincoln", " Alban", "concurrent", " harm",
    " Fem", "た", "工", " crack", "Bi", " dawn", " diferen", " conver", "file", " mir", " pract", "km", "ío",
    "љ", "tar", " current", " Fritz", " tell", " Park", " Doc", "yaml", "ilor", "TIME", "使", " consec", "ima",
    " theoret", " fem", "bucket", " =>", " Consultado", " stages", " October", "ṭ", "arning", " Mor",
    " health", " Mundo", " bell", " nak", " персона", "рі", " the", " of", " and", " to", " in", " is",
    " that", " it", " was", " for", " on", " with", " as", " at", " by", " this", " from", " river",
    " light", " model", " token", " slot", " server", " quick", " brown", " fox",
]


def piece_id(piece: str) -> int:
    token = _FIRST_FREE_ID + zlib.crc32(piece.encode("utf-8")) % (N_VOCAB - _FIRST_FREE_ID)
    _id_to_piece.setdefault(token, piece)
    return token


def tokenize(text: str, add_bos: bool = False) -> list[int]:
    """Split like SentencePiece: a space is glued to the word after it; the text gets one leading space."""
    pieces = split_pieces(text)
    ids = [piece_id(p) for p in pieces]
    return [BOS_ID, *ids] if add_bos else ids


def split_pieces(text: str) -> list[str]:
    if not text:
        return []
    return _PIECE.findall(text if text.startswith(" ") else " " + text)


def detokenize(tokens: list[int]) -> str:
    return "".join(piece_for(t) for t in tokens)


def piece_for(token: int) -> str:
    if token == BOS_ID:
        return BOS_PIECE
    if token == EOS_ID:
        return "</s>"
    return _id_to_piece.get(token, f" <{token}>")


class TextGenerator:
    """Deterministic pseudo-text: the same seed and task number give the same answer."""

    def __init__(self, seed: int, task_id: int) -> None:
        self._rng = random.Random(seed * 1_000_003 + task_id)

    def next_piece(self) -> tuple[int, str]:
        piece = self._rng.choice(VOCAB)
        return piece_id(piece), piece


for _piece in VOCAB:
    piece_id(_piece)
