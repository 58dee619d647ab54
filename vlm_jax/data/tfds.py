"""tfds source: any image + question/answer dataset prepared as array_record, read without TensorFlow.

`tfds.data_source` gives random access to the prepared files, so grain samples, shards and resumes it like any
other source. Field names come from config (data.tfds.*): the image field holds encoded bytes (JPEG/PNG) or a
uint8[H, W, 3] tensor; the question/answer fields hold text (bytes or str); the answer may be a list, whose first
entry is the target. Each record becomes one user turn "<image>\\n{question}" and one assistant turn.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from vlm_jax.data import errors, images
from vlm_jax.data.tokenize import ASSISTANT, IMAGE_PLACEHOLDER, USER


class TfdsSource:
    """grain RandomAccessDataSource over one split of a prepared tfds dataset. Item i -> {'index': i, 'record'}."""

    def __init__(self, name: str, split: str, data_dir: str = ""):
        if not name:
            raise ValueError("data.tfds.name is empty; name a tfds dataset prepared as array_record")
        self.name, self.split, self.data_dir = name, split, data_dir
        self._source = None
        self._len = len(self._open())

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
            try:
                self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir or None,
                                                download=False)
            except Exception as e:  # tfds raises several types for a missing or unprepared dataset
                raise ValueError(f"cannot open tfds dataset {self.name!r} split {self.split!r} "
                                 f"(data_dir {self.data_dir!r}) as an array_record data source: {e}") from e
        return self._source

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": int(i), "record": self._open()[int(i)]}

    def __getstate__(self):  # each worker reopens the files
        return {**self.__dict__, "_source": None}

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


def _text(value: Any, field: str) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise errors.BadRecord(errors.INVALID_UTF8, f"field {field!r}: {e}") from None
    if isinstance(value, str):
        return value
    raise errors.BadRecord(errors.BAD_FIELD, f"field {field!r} is a {type(value).__name__}, not text")


class TfdsToRecord:
    """{'index', 'record'} -> {'id', 'image': uint8[S, S, 3], 'turns'} or a bad-input marker."""

    def __init__(self, *, image_field: str, question_field: str, answer_field: str, id_field: str,
                 image_size: int, aspect_ratio: str, name: str):
        if aspect_ratio not in images.ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio must be one of {images.ASPECT_RATIOS}, got {aspect_ratio!r}")
        self.image_field, self.question_field, self.answer_field = image_field, question_field, answer_field
        self.id_field, self.image_size, self.aspect_ratio, self.name = id_field, image_size, aspect_ratio, name

    def __repr__(self) -> str:
        return (f"TfdsToRecord({self.image_field!r}, {self.question_field!r}, {self.answer_field!r}, "
                f"{self.id_field!r}, {self.image_size}, {self.aspect_ratio!r})")

    def _field(self, record: dict[str, Any], field: str) -> Any:
        if field not in record:
            raise errors.BadRecord(errors.BAD_FIELD, f"no field {field!r} (fields: {sorted(record)})")
        return record[field]

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        record = item["record"]
        record_id = f"{self.name}:{item['index']}"
        try:
            if self.id_field:
                raw_id = self._field(record, self.id_field)
                record_id = _text(raw_id, self.id_field) if isinstance(raw_id, (bytes, str)) else str(raw_id)
            question = _text(self._field(record, self.question_field), self.question_field)
            answer = self._field(record, self.answer_field)
            if isinstance(answer, (list, tuple)) or (isinstance(answer, np.ndarray) and answer.ndim == 1):
                if len(answer) == 0:
                    raise errors.BadRecord(errors.ONE_SIDED_CONVERSATION, f"field {self.answer_field!r} is empty")
                answer = answer[0]
            answer = _text(answer, self.answer_field)
            if not answer.strip():
                raise errors.BadRecord(errors.ONE_SIDED_CONVERSATION, "empty answer")
            if not question.strip():
                raise errors.BadRecord(errors.ONE_SIDED_CONVERSATION, "empty question")
            image = self._field(record, self.image_field)
            if isinstance(image, np.ndarray) and image.dtype == object:
                image = image.item()
            pixels = images.preprocess(image, self.image_size, self.aspect_ratio)
        except errors.BadRecord as e:
            return errors.marker(record_id, e)
        user = question if IMAGE_PLACEHOLDER in question else f"{IMAGE_PLACEHOLDER}\n{question}"
        return {"id": record_id, "image": pixels, "turns": [(USER, user), (ASSISTANT, answer)]}


def make_source(data_cfg: ml_collections.ConfigDict, split: str, image_size: int
                ) -> tuple[TfdsSource, list[TfdsToRecord]]:
    t = data_cfg.tfds
    splits = {"train": t.train_split, "validation": t.validation_split}
    source = TfdsSource(t.name, splits.get(split, split), t.data_dir)
    return source, [TfdsToRecord(image_field=t.image_field, question_field=t.question_field,
                                 answer_field=t.answer_field, id_field=t.id_field, image_size=image_size,
                                 aspect_ratio=data_cfg.image_aspect_ratio, name=t.name)]
