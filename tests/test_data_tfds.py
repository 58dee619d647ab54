"""The tfds path: a dataset built here as array_record, read through tfds.data_source and grain, no TensorFlow."""

import io
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds   # a requirement: missing, this module must fail, not skip
from PIL import Image

from vlm_jax.data import errors, images, pipeline

N_TRAIN = 12


def png(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((10, 14, 3), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class TinyShapesVqa(tfds.core.GeneratorBasedBuilder):
    """Encoded PNG bytes + question + a list of answers; record 5 of train has an empty answer list."""

    VERSION = tfds.core.Version("1.0.0")
    # No checksums file belongs to a builder defined in a test. Saying so also skips tfds's package-resource lookup
    # of the builder's source file, which needs `importlib_resources` when the module is inside a package.
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "jpeg": tfds.features.Tensor(shape=(), dtype=np.object_),  # bytes: Image features would need TF
            "query": tfds.features.Text(),
            "answers": tfds.features.Sequence(tfds.features.Text()),
            "qid": tfds.features.Tensor(shape=(), dtype=np.int64),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(N_TRAIN), "validation": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"jpeg": png(20 * i), "query": "what color is the circle?",
                      "answers": [] if i == 5 else ["red", "blue"], "qid": 100 + i}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    TinyShapesVqa(data_dir=str(d), file_format="array_record").download_and_prepare()
    return str(d)


def tfds_config(data_dir, policy="skip"):
    cfg = pipeline.default_config()
    cfg.source, cfg.bad_input = "tfds", policy
    t = cfg.tfds
    t.name, t.data_dir = "tiny_shapes_vqa", data_dir
    t.image_field, t.question_field, t.answer_field, t.id_field = "jpeg", "query", "answers", "qid"
    return cfg


def test_tfds_records_become_contract_batches_without_tensorflow(data_dir):
    cfg = tfds_config(data_dir)
    tok = pipeline.make_tokenizer(cfg)
    it = pipeline.make_train_iterator(cfg, tokenizer=tok, num_visual_tokens=4, image_size=8, batch_size=11, seed=0)
    batch = next(it)  # 11 good records in the epoch: exactly one of each, the bad one skipped
    assert "tensorflow" not in sys.modules
    assert batch["pixels"].shape == (11, 8, 8, 3) and dict(it.bad_input.counts) == {errors.ONE_SIDED_CONVERSATION: 1}
    assert it.bad_input.examples[errors.ONE_SIDED_CONVERSATION][0].startswith("105")  # named by the id field
    for row, mask in zip(batch["tokens"], batch["attention_mask"]):
        assert tok.decode(row[mask > 0]) == "user\n\nwhat color is the circle?\nassistant\nred\n"
    # Every stored image came through the same preprocessing, once each.
    want = {images.normalize(images.preprocess(png(20 * i), 8, "pad")).tobytes() for i in range(N_TRAIN) if i != 5}
    assert {p.tobytes() for p in batch["pixels"]} == want


def test_tfds_bad_record_raises_under_error_and_validation_split_is_read(data_dir):
    cfg = tfds_config(data_dir, policy="error")
    tok = pipeline.make_tokenizer(cfg)
    it = pipeline.make_train_iterator(cfg, tokenizer=tok, num_visual_tokens=4, image_size=8, batch_size=12, seed=0)
    with pytest.raises(errors.BadInputError, match="'105'.*one_sided_conversation"):
        next(it)
    val = pipeline.make_train_iterator(cfg, tokenizer=tok, num_visual_tokens=4, image_size=8, batch_size=3,
                                       seed=0, split="validation")
    assert next(val)["tokens"].shape == (3, cfg.seq_len + 4)


def test_missing_tfds_dataset_or_field_is_a_clear_error(data_dir):
    cfg = tfds_config(data_dir)
    cfg.tfds.name = "no_such_dataset"
    with pytest.raises(ValueError, match="no_such_dataset"):
        pipeline.make_train_iterator(cfg, tokenizer=pipeline.make_tokenizer(cfg), num_visual_tokens=4,
                                     image_size=8, batch_size=2)
    cfg = tfds_config(data_dir, policy="error")
    cfg.tfds.question_field = "prompt"
    it = pipeline.make_train_iterator(cfg, tokenizer=pipeline.make_tokenizer(cfg), num_visual_tokens=4,
                                      image_size=8, batch_size=2)
    with pytest.raises(errors.BadInputError, match="no field 'prompt'"):
        next(it)
