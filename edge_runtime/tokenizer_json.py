"""Read tokenizer.json like json.loads, except that `model.merges` is streamed from the text, not materialized.

A 49k-merge list is ~100k small Python objects (~10 MB) that are freed right after the merge table is built,
but freed small objects leave the interpreter's memory pools fragmented, so the process keeps that RSS for
good. Scanning each merge string out of the text when it is needed reuses the same few objects instead.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from json.decoder import scanstring

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()

def _skip(text: str, i: int) -> int:
    return _WS.match(text, i).end()


def _expect(text: str, i: int, char: str) -> int:
    if text[i:i + 1] != char:
        raise ValueError(f"expected {char!r} at char {i} of tokenizer.json")
    return i + 1


class LazyMerges:
    """The merges array as a re-iterable view over the text: items are "a b" strings or [a, b] lists."""

    def __init__(self, text: str, start: int):
        self.text, self.start = text, start
        self.count = 0
        for _ in self._items():
            self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator:
        return self._items()

    def _items(self) -> Iterator:
        text = self.text
        i = _skip(text, _expect(text, self.start, "["))
        if text[i:i + 1] == "]":
            self.end = i + 1
            return
        while True:
            if text[i:i + 1] == '"':
                item, i = scanstring(text, i + 1)
            else:
                item, i = _DECODER.raw_decode(text, i)
            yield item
            i = _skip(text, i)
            if text[i:i + 1] == "]":
                self.end = i + 1
                return
            i = _skip(text, _expect(text, i, ","))


def _object(text: str, i: int, value: Callable[[str, int], tuple[object, int]]) -> tuple[dict, int]:
    """Parse the JSON object at text[i] with `value(key, i) -> (value, end)` for each member."""
    out: dict = {}
    i = _skip(text, _expect(text, _skip(text, i), "{"))
    if text[i:i + 1] == "}":
        return out, i + 1
    while True:
        key, i = scanstring(text, _expect(text, i, '"'))
        i = _skip(text, _expect(text, _skip(text, i), ":"))
        out[key], i = value(key, i)
        i = _skip(text, i)
        if text[i:i + 1] == "}":
            return out, i + 1
        i = _skip(text, _expect(text, i, ","))


def loads(text: str) -> dict:
    """json.loads(text) for a tokenizer.json, with spec["model"]["merges"] a LazyMerges when it is an array."""

    def model_member(key: str, i: int):
        if key == "merges" and text[i:i + 1] == "[":
            merges = LazyMerges(text, i)
            return merges, merges.end
        return _DECODER.raw_decode(text, i)

    def top_member(key: str, i: int):
        if key == "model" and text[i:i + 1] == "{":
            return _object(text, i, model_member)
        return _DECODER.raw_decode(text, i)

    spec, end = _object(text, 0, top_member)
    if _skip(text, end) != len(text):
        raise ValueError(f"extra data after the JSON object at char {end} of tokenizer.json")
    return spec
