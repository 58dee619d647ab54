"""Bad-input handling: one exception per bad record, a policy, and the counts.

A record that cannot become a correct example (missing image, broken JSON, ...) raises `BadRecord` inside its
per-record transform. The transform turns that into a small marker dict instead of letting it escape, so nothing ever
crashes deep inside a grain worker. The iterator in the main process then applies the policy: `skip` counts the
record and moves on, `error` raises `BadInputError` naming the record id and the reason.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping
from typing import Any

from vlm_jax import files

# Reasons, one per kind of bad input. They key the skip counts.
MALFORMED_JSON = "malformed_json"
INVALID_UTF8 = "invalid_utf8"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"   # more pixels than Pillow decodes (a decompression bomb, PIL.Image.MAX_IMAGE_PIXELS)
JSON_TOO_DEEP = "json_too_deep"       # nested deeper than Python's JSON parser can follow (its recursion limit)
IMAGE_PLACEHOLDERS = "image_placeholder_count"
EMPTY_CONVERSATION = "empty_conversation"
ONE_SIDED_CONVERSATION = "one_sided_conversation"
BAD_ROLES = "bad_roles"
TOO_LONG = "too_long"
BAD_FIELD = "bad_field"
BAD_PATH = "bad_path"   # an image path that is absolute or leaves the image folder
# Counted like bad input, but the example is kept: a question longer than data.question_len reaches a
# query-conditioned compressor without its beginning.
QUESTION_TRUNCATED = "question_truncated"

REASONS = (MALFORMED_JSON, INVALID_UTF8, MISSING_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE, JSON_TOO_DEEP, IMAGE_PLACEHOLDERS,
           EMPTY_CONVERSATION, ONE_SIDED_CONVERSATION, BAD_ROLES, TOO_LONG, BAD_FIELD, BAD_PATH, QUESTION_TRUNCATED)

POLICIES = ("skip", "error")

# A bad record travels through the pipeline as a marker dict carrying these three keys instead of an example.
BAD_REASON_KEY = "bad_reason"
BAD_ID_KEY = "bad_id"
BAD_DETAIL_KEY = "bad_detail"
# A kept example that is still worth counting carries this key: (reason, detail), then (reason, record id, detail)
# once the encoding step adds the id; the batcher counts and removes it.
NOTE_KEY = "input_note"


class BadRecord(Exception):
    """Raised by per-record code for a record that must not become an example."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown bad-input reason {reason!r}; known: {REASONS}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadInputError(ValueError):
    """Raised in the main process under the `error` policy; names the record and the reason."""

    def __init__(self, record_id: str, reason: str, detail: str = ""):
        super().__init__(f"bad input record {record_id!r}: {reason}" + (f" ({detail})" if detail else ""))
        self.record_id = record_id
        self.reason = reason
        self.detail = detail


def marker(record_id: str, err: BadRecord) -> dict[str, str]:
    """The dict that replaces a bad record in the stream."""
    return {BAD_REASON_KEY: err.reason, BAD_ID_KEY: str(record_id), BAD_DETAIL_KEY: err.detail}


def is_marker(record: Mapping[str, Any]) -> bool:
    return BAD_REASON_KEY in record


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"data.bad_input must be one of {POLICIES}, got {policy!r}")
    return policy


class BadInputCounter:
    """Counts skipped records per reason and keeps the first few ids of each.

    Its state is plain JSON so it rides along with the iterator state in a checkpoint: a resumed run keeps counting
    from where it stopped.
    """

    def __init__(self, keep_examples: int = 20):
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = {}
        self._keep = keep_examples

    def add(self, reason: str, record_id: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ids = self.examples.setdefault(reason, [])
        if len(ids) < self._keep:
            ids.append(f"{record_id}: {detail}" if detail else record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.counts = collections.Counter(state.get("counts", {}))
        self.examples = {k: list(v) for k, v in state.get("examples", {}).items()}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Writes {"total", "counts", "examples"} as JSON, e.g. to run_dir/bad_input.json (a local path or a
        bucket: vlm_jax.files)."""
        files.write_text_atomic(path, json.dumps({"total": self.total, **self.state()}, indent=2, sort_keys=True))
