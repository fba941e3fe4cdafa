"""CaseOps: a lossless case transform, so that a tokenizer need not spend pieces on case variants.

encode() lowercases every ASCII word (a maximal run of A-Z and a-z) and marks its case with operator
characters from the private-use area, which the tokenizer reserves as user-defined symbols:

  TITLE    U+E001  the word's first letter is upper case     "The"    -> TITLE "the"
  ALLCAPS  U+E002  every letter is (two letters or more)     "NASA"   -> ALLCAPS "nasa"
  CAPNEXT  U+E003  the next letter is, within a mixed word   "iPhone" -> "i" CAPNEXT "phone"
  ESC      U+E004  the next character is an operator character that was in the text itself

A mixed word starting upper case is TITLE, its first letter, then CAPNEXT before each later capital
("OpenAI" -> TITLE "open" CAPNEXT "a" CAPNEXT "i"). Every other character is left as it is, so
decode(encode(x)) == x for every string x, whatever its scripts or case mappings. These are the rules and
characters of the records' CaseOps (#1729 on), so text encoded here matches their published tokenizer.

bpb stays charged on the original text: original_byte_mask() marks which UTF-8 bytes of an encoded string
are bytes of the original (all but the operators'), and data/build_shards.py charges each token the
original bytes it covers in its byte sidecar.
"""
from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # SentencePiece user-defined symbols, in this order
_WORD_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004]")
# Operators as decode() reads them: ESC with the character it escapes, ALLCAPS with its run of letters,
# TITLE/CAPNEXT with their letter; any other operator character is misplaced.
_DECODE = re.compile("\ue004(.)|\ue002([a-z]+)|[\ue001\ue003]([a-z])|[\ue001-\ue004]", re.S)
_ACTING = re.compile("\ue004.|[\ue001-\ue004]", re.S)  # an operator that acts (an escaped one is text)


def _encode_word(m: re.Match) -> str:
    w = m.group()
    if w in OPERATORS:
        return ESC + w
    if w.islower():
        return w
    low = w.lower()
    if len(w) > 1 and w.isupper():
        return ALLCAPS + low
    if w[0].isupper() and (len(w) == 1 or w[1:].islower()):
        return TITLE + low
    head = TITLE + low[0] if w[0].isupper() else w[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in w[1:])


def encode(text: str) -> str:
    return _WORD_OR_OPERATOR.sub(_encode_word, text)


def _decode_op(m: re.Match) -> str:
    escaped, caps, cap = m.groups()
    if escaped is not None and escaped in OPERATORS:
        return escaped
    if caps or cap:
        return (caps or cap).upper()
    raise ValueError(f"not a CaseOps encoding: misplaced operator U+{ord(m.group()[0]):04X} at {m.start()}")


def decode(text: str) -> str:
    """The inverse of encode(); ValueError for an operator encode() would not have written there."""
    return _DECODE.sub(_decode_op, text)


def original_byte_mask(encoded: str) -> np.ndarray:
    """One bool per UTF-8 byte of `encoded`: true for bytes of the original text, false for an acting
    operator's 3 bytes. Its sum is the original text's UTF-8 length."""
    cps = np.frombuffer(encoded.encode("utf-32-le"), dtype="<u4")
    width = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
    keep = np.ones(len(cps), dtype=bool)
    for m in _ACTING.finditer(encoded):
        keep[m.start()] = False  # ESC's target, the next character, stays original text
    return np.repeat(keep, width)
