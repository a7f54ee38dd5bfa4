"""How deeply a JSON document may nest, checked on the raw text before it is parsed.

orjson parses 1,024 levels but serializes only 255, so a document nested deeper than that
would parse, then fail when tidings re-encodes it (an internal error, a close 1011). Checking
before parsing also keeps a hostile document from costing more than a scan of its bytes.
"""

from __future__ import annotations

import itertools
import re

#: deepest nesting (objects and arrays) accepted in a client frame or an API body, including the
#: envelope (``{"publish": {"data": ...}}`` uses 2 levels); well under orjson's 255 for encoding
MAX_DEPTH = 128

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
#: every byte but the four brackets, deleted by bytes.translate
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: opening brackets count +1, closing ones -1
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def too_deep(raw: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """True when JSON text ``raw`` nests objects/arrays more than ``limit`` levels deep.

    Brackets inside strings do not count. Linear in ``len(raw)``; a document with no more than
    ``limit`` brackets in all is accepted after two counts, the usual case. Not a validator:
    malformed JSON is left to the parser."""
    data = raw.encode() if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _STRINGS.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(itertools.accumulate(_STEP[b] for b in brackets), default=0) > limit
