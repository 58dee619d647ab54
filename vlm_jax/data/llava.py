"""LLaVA-format source: a JSON list or JSONL file of records plus an image folder.

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

A record without "image" is text-only. `LlavaSource` only indexes the file (byte offsets), so a worker reads one
record at a time; `ParseLlava` decodes, validates and loads the image inside the worker. Per-record problems (broken
JSON line, invalid UTF-8, missing/corrupt image, bad conversation) become bad-input markers (errors.py); a JSON list
file that does not parse at all is a ValueError at construction, since no record boundary can be trusted.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import ml_collections
import numpy as np

from vlm_jax.data import errors, features, images
from vlm_jax.data.tokenize import ASSISTANT, USER

ROLES = {"human": USER, "gpt": ASSISTANT}
_WS = re.compile(r"[ \t\n\r]*")
# What decides where a JSON array or object ends: its brackets, outside strings (escapes included).
_BRACKETS_OUTSIDE_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)


def _skip_ws(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()


def _nested_end(text: str, pos: int) -> int:
    """The end of the array or object starting at text[pos], found without recursion: for a record nested deeper
    than the JSON decoder follows, kept whole so that ParseLlava flags it (json_too_deep) instead of the file."""
    depth = 0
    for m in _BRACKETS_OUTSIDE_STRINGS.finditer(text, pos):
        c = m.group()
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
    raise IndexError   # never closed


class LlavaSource:
    """grain RandomAccessDataSource over the records of a LLaVA JSON/JSONL file.

    Item i -> {'raw': bytes of record i, 'fallback_id': '<file>:<line or index>'}. JSONL is read lazily by offset;
    a JSON list is split into its records' raw texts once here, kept in one bytes buffer.
    """

    def __init__(self, json_path: str):
        if not json_path or not os.path.isfile(json_path):
            raise ValueError(f"LLaVA json_path {json_path!r} is not a file")
        self.json_path = str(json_path)
        self._name = os.path.basename(self.json_path)
        with open(self.json_path, "rb") as f:
            data = f.read()
        if re.match(rb"\s*\[", data):
            self._blob, self._starts, self._ends, self._labels = self._index_list(data)
        else:
            self._blob = None
            self._starts, self._ends, self._labels = self._index_lines(data)
        if not len(self._starts):
            raise ValueError(f"LLaVA file {self.json_path!r} holds no records")

    def _index_list(self, data: bytes):
        """Splits a JSON list into its elements' raw texts, decoding one element at a time: memory holds the file,
        its text and the records' bytes, never the Python objects of all records at once (LLaVA-665K is ~1 GB)."""
        # surrogateescape keeps invalid UTF-8 bytes, so the record holding them is flagged rather than the file
        text = data.decode("utf-8", "surrogateescape")
        decoder = json.JSONDecoder()
        parts: list[bytes] = []
        pos = _skip_ws(text, text.index("[") + 1)
        try:
            while text[pos] != "]":
                try:
                    _, end = decoder.raw_decode(text, pos)
                except RecursionError:
                    end = _nested_end(text, pos)
                parts.append(text[pos:end].encode("utf-8", "surrogateescape"))
                pos = _skip_ws(text, end)
                if text[pos] == ",":
                    pos = _skip_ws(text, pos + 1)
                    if text[pos] == "]":
                        raise json.JSONDecodeError("trailing comma", text, pos)
                elif text[pos] != "]":
                    raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"LLaVA file {self.json_path!r} is not a valid JSON list: {e}") from None
        except IndexError:
            raise ValueError(f"LLaVA file {self.json_path!r} ends before its JSON list is closed") from None
        if _skip_ws(text, pos + 1) != len(text):
            raise ValueError(f"LLaVA file {self.json_path!r} has data after its JSON list (at char {pos + 1})")
        lengths = np.asarray([len(p) for p in parts], np.int64)
        ends = np.cumsum(lengths)
        return b"".join(parts), ends - lengths, ends, np.arange(len(parts), dtype=np.int64)

    @staticmethod
    def _index_lines(data: bytes):
        starts, ends, lines = [], [], []
        pos = 0
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            if line.strip():
                starts.append(pos)
                ends.append(pos + len(line))
                lines.append(lineno)
            pos += len(line) + 1
        return np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(lines, np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        start, end = int(self._starts[i]), int(self._ends[i])
        if self._blob is not None:
            raw = self._blob[start:end]
            fallback = f"{self._name}:record {int(self._labels[i])}"
        else:
            with open(self.json_path, "rb") as f:  # per read: thread-safe, and cheap next to an image decode
                f.seek(start)
                raw = f.read(end - start)
            fallback = f"{self._name}:line {int(self._labels[i])}"
        return {"raw": raw, "fallback_id": fallback}

    def __repr__(self) -> str:
        return f"LlavaSource({self.json_path!r}, {len(self)} records)"


def parse_turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    """[(role, text)] from a record's conversations. Raises BadRecord."""
    conv = record.get("conversations")
    if conv is None or (isinstance(conv, list) and not conv):
        raise errors.BadRecord(errors.EMPTY_CONVERSATION, "no conversations")
    if not isinstance(conv, list):
        raise errors.BadRecord(errors.BAD_FIELD, f"conversations is a {type(conv).__name__}, not a list")
    turns = []
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise errors.BadRecord(errors.BAD_FIELD, f"turn {k} is not {{from, value: str}}")
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise errors.BadRecord(errors.BAD_ROLES, f"turn {k} has from={turn.get('from')!r}, not human/gpt")
        turns.append((role, turn["value"]))
    if not any(text.strip() for _, text in turns):
        raise errors.BadRecord(errors.EMPTY_CONVERSATION, "every turn is empty")
    return turns


class ParseLlava:
    """{'raw', 'fallback_id'} -> {'id', 'image': uint8[S, S, 3] | None, 'turns'} or a bad-input marker."""

    def __init__(self, image_dir: str, image_size: int, aspect_ratio: str = "pad"):
        if aspect_ratio not in images.ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {images.ASPECT_RATIOS}, got {aspect_ratio!r}")
        self.image_dir, self.image_size, self.aspect_ratio = image_dir, image_size, aspect_ratio

    def __repr__(self) -> str:
        return f"ParseLlava({self.image_dir!r}, {self.image_size}, {self.aspect_ratio!r})"

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        record_id = item["fallback_id"]
        try:
            try:
                text = item["raw"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise errors.BadRecord(errors.INVALID_UTF8, str(e)) from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise errors.BadRecord(errors.MALFORMED_JSON, str(e)) from None
            except RecursionError:
                raise errors.BadRecord(errors.JSON_TOO_DEEP, f"nested deeper than the JSON parser follows "
                                       f"(Python's recursion limit, {sys.getrecursionlimit()})") from None
            if not isinstance(record, dict):
                raise errors.BadRecord(errors.MALFORMED_JSON, f"record is a {type(record).__name__}, not an object")
            record_id = str(record.get("id", record_id))
            turns = parse_turns(record)
            image_name = record.get("image")
            if image_name is not None and not isinstance(image_name, str):
                raise errors.BadRecord(errors.BAD_FIELD, f"image is a {type(image_name).__name__}, not a path")
            features.check_turns(turns, has_image=image_name is not None)  # before paying for the image decode
            pixels = None
            if image_name is not None:
                pixels = images.preprocess(images.path_inside(self.image_dir, image_name), self.image_size,
                                           self.aspect_ratio)
        except errors.BadRecord as e:
            return errors.marker(record_id, e)
        return {"id": record_id, "image": pixels, "turns": turns}


def make_source(data_cfg: ml_collections.ConfigDict, split: str, image_size: int
                ) -> tuple[LlavaSource, list[ParseLlava]]:
    paths = {"train": data_cfg.llava.json_path, "validation": data_cfg.llava.validation_json_path}
    if split not in paths:
        raise ValueError(f"LLaVA split must be one of {sorted(paths)}, got {split!r}")
    return LlavaSource(paths[split]), [ParseLlava(data_cfg.llava.image_dir, image_size, data_cfg.image_aspect_ratio)]
