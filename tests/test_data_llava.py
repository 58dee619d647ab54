"""LLaVA-format source: records, text-only records, and every kind of bad input under both policies."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_data_images import png_bomb
from vlm_jax.data import errors, pipeline

GOOD_CONV = [{"from": "human", "value": "<image>\nwhat color is the circle?"}, {"from": "gpt", "value": "red"}]
N_GOOD = 7


def png(path, value, shape=(20, 30)):
    Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(path)


def conv(question, answer="red"):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def make_bad(kind, tmp_path):
    """(one bad JSONL line as bytes, expected reason) for each kind of bad input."""
    def rec(**fields):
        return json.dumps({"id": "bad", "image": "good0.png", "conversations": GOOD_CONV, **fields}).encode()

    if kind == "missing_image":
        return rec(image="nope.png"), errors.MISSING_IMAGE
    if kind == "corrupt_image":
        (tmp_path / "junk.png").write_bytes(b"\x89PNG but not really")
        return rec(image="junk.png"), errors.CORRUPT_IMAGE
    if kind == "truncated_image":
        buf = io.BytesIO()
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, "JPEG")
        (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:300])
        return rec(image="cut.jpg"), errors.CORRUPT_IMAGE
    if kind == "no_placeholder":
        return rec(conversations=conv("what color is the circle?")), errors.IMAGE_PLACEHOLDERS
    if kind == "several_placeholders":
        return rec(conversations=conv("<image>\n<image>\nwhat color is the circle?")), errors.IMAGE_PLACEHOLDERS
    if kind == "empty_conversation":
        return rec(conversations=[]), errors.EMPTY_CONVERSATION
    if kind == "one_sided_conversation":
        return rec(conversations=GOOD_CONV[:1]), errors.ONE_SIDED_CONVERSATION
    if kind == "bad_role":
        return rec(conversations=[GOOD_CONV[0], {"from": "bot", "value": "red"}]), errors.BAD_ROLES
    if kind == "too_long_answer_cut":
        return rec(conversations=conv("<image>\n" + "what " * 60)), errors.TOO_LONG
    if kind == "too_long_slots_cut":
        return rec(conversations=conv("what " * 60 + "<image>")), errors.TOO_LONG
    if kind == "invalid_utf8":
        return rec(conversations=conv("<image>\nwhat color is the circle?", "ANSWER")).replace(
            b"ANSWER", b"r\xffd"), errors.INVALID_UTF8
    # Paths out of the image folder, each to a real image: only the containment check refuses them.
    if kind in ("path_escape", "absolute_path", "symlink_escape"):
        outside = tmp_path.parent / f"{tmp_path.name}_outside.png"
        png(outside, 99)
        if kind == "symlink_escape":
            (tmp_path / "link.png").symlink_to(outside)
        name = {"path_escape": f"../{outside.name}", "absolute_path": str(outside), "symlink_escape": "link.png"}
        return rec(image=name[kind]), errors.BAD_PATH
    if kind == "malformed_json":
        return b'{"id": "bad", "image": "good0.png", "conversations": [', errors.MALFORMED_JSON
    if kind == "decompression_bomb":   # 4e8 pixels declared in a 60-byte file: Pillow refuses to decode it
        (tmp_path / "bomb.png").write_bytes(png_bomb(20000, 20000))
        return rec(image="bomb.png"), errors.IMAGE_TOO_LARGE
    if kind == "deep_json":   # valid JSON, nested far deeper than Python's recursion limit
        return rec()[:-1] + b', "x": ' + DEEP + b"}", errors.JSON_TOO_DEEP
    raise AssertionError(kind)


DEEP = b"[" * 100_000 + b"]" * 100_000


KINDS = ["missing_image", "corrupt_image", "truncated_image", "no_placeholder", "several_placeholders",
         "empty_conversation", "one_sided_conversation", "bad_role", "too_long_answer_cut", "too_long_slots_cut",
         "invalid_utf8", "malformed_json", "path_escape", "absolute_path", "symlink_escape", "decompression_bomb",
         "deep_json"]


def write_jsonl(tmp_path, bad_line=None):
    lines = []
    for i in range(N_GOOD):
        png(tmp_path / f"good{i}.png", 30 * i)
        lines.append(json.dumps({"id": f"good{i}", "image": f"good{i}.png", "conversations": GOOD_CONV}).encode())
    if bad_line is not None:
        lines.insert(3, bad_line)
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def llava_config(json_path, image_dir, policy="skip"):
    cfg = pipeline.default_config()
    cfg.source, cfg.bad_input = "llava", policy
    cfg.llava.json_path, cfg.llava.image_dir = json_path, str(image_dir)
    return cfg


def make(cfg, batch_size=4):
    return pipeline.make_train_iterator(cfg, tokenizer=pipeline.make_tokenizer(cfg), num_visual_tokens=4,
                                        image_size=16, batch_size=batch_size, seed=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_record_is_skipped_and_counted_under_skip(kind, tmp_path):
    line, reason = make_bad(kind, tmp_path)
    cfg = llava_config(write_jsonl(tmp_path, line), tmp_path, "skip")
    it = make(cfg)
    tok = pipeline.make_tokenizer(cfg)
    for _ in range(3):  # 12 good examples > 7: the bad record was passed at least once
        batch = next(it)
        for row, mask in zip(batch["tokens"], batch["attention_mask"]):  # every row is a good record, intact
            assert tok.decode(row[mask > 0]) == "user\n\nwhat color is the circle?\nassistant\nred\n"
    assert set(it.bad_input.counts) == {reason} and it.bad_input.counts[reason] >= 1
    report = tmp_path / "bad_input.json"
    it.bad_input.write(report)
    assert json.loads(report.read_text())["counts"] == dict(it.bad_input.counts)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_record_stops_the_run_with_its_id_and_reason_under_error(kind, tmp_path):
    line, reason = make_bad(kind, tmp_path)
    it = make(llava_config(write_jsonl(tmp_path, line), tmp_path, "error"))
    with pytest.raises(errors.BadInputError) as e:
        for _ in range(4):
            next(it)
    assert e.value.reason == reason
    # Records that parse carry their own id; unparseable lines are named by file and line number.
    expected_id = "data.jsonl:line 4" if kind in ("invalid_utf8", "malformed_json", "deep_json") else "bad"
    assert e.value.record_id == expected_id and expected_id in str(e.value) and reason in str(e.value)


def test_text_only_records_and_json_list_files_are_read(tmp_path):
    png(tmp_path / "a.png", 200, shape=(16, 16))
    records = [{"id": "img", "image": "a.png", "conversations": GOOD_CONV},
               {"id": "txt", "conversations": conv("what color is the circle?", "blue")}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    batch = next(make(llava_config(str(path), tmp_path), batch_size=2))
    length = pipeline.default_config().seq_len + 4
    text_only = [i for i in range(2) if (batch["image_positions"][i] == length).all()]
    assert len(text_only) == 1
    img = 1 - text_only[0]
    np.testing.assert_array_equal(batch["image_positions"][img], [3, 4, 5, 6])
    np.testing.assert_allclose(batch["pixels"][img], pipeline.images.normalize(np.full((16, 16, 3), 200, np.uint8)),
                               atol=1e-6)


def test_invalid_utf8_inside_a_json_list_flags_only_that_record(tmp_path):
    png(tmp_path / "a.png", 10)
    good = json.dumps({"id": "ok", "image": "a.png", "conversations": GOOD_CONV}).encode()
    bad = good.replace(b'"ok"', b'"b\xffd"')
    path = tmp_path / "data.json"
    path.write_bytes(b"[" + good + b"," + bad + b"]")
    it = make(llava_config(str(path), tmp_path), batch_size=2)
    next(it)  # two good examples: two epochs, so the bad record is passed once or twice
    assert set(it.bad_input.counts) == {errors.INVALID_UTF8}
    assert it.bad_input.examples[errors.INVALID_UTF8][0].startswith("data.json:record 1")


def test_a_record_nested_too_deep_inside_a_json_list_flags_only_that_record(tmp_path):
    png(tmp_path / "a.png", 10)
    good = json.dumps({"id": "ok", "image": "a.png", "conversations": GOOD_CONV}).encode()
    # Brackets and an escaped quote inside a string must not count when finding where the deep record ends.
    deep = b'{"id": "deep", "note": "] } \\" [ {", "x": ' + DEEP + b"}"
    path = tmp_path / "data.json"
    path.write_bytes(b"[" + good + b",\n" + deep + b" , " + good.replace(b'"ok"', b'"ok2"') + b"]")
    it = make(llava_config(str(path), tmp_path), batch_size=2)
    next(it), next(it)   # four good examples out of two good records: the deep one was passed
    assert set(it.bad_input.counts) == {errors.JSON_TOO_DEEP}
    assert it.bad_input.examples[errors.JSON_TOO_DEEP][0].startswith("data.json:record 1")


def test_unparseable_json_list_file_fails_at_once_naming_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": 1}, {"id": 2 "x"}]')
    with pytest.raises(ValueError, match="broken.json.*not a valid JSON list"):
        make(llava_config(str(path), tmp_path))
    with pytest.raises(ValueError, match="is not a file"):
        make(llava_config(str(tmp_path / "absent.json"), tmp_path))


def test_skip_counts_survive_a_state_restore(tmp_path):
    line, reason = make_bad("missing_image", tmp_path)
    cfg = llava_config(write_jsonl(tmp_path, line), tmp_path)
    it = make(cfg)
    next(it), next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = make(cfg)
    resumed.set_state(state)
    assert resumed.bad_input.counts == it.bad_input.counts and resumed.bad_input.counts[reason] >= 1


def test_a_run_of_only_bad_records_is_an_error_even_under_skip(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(["{not json"] * 5))
    cfg = llava_config(str(path), tmp_path)
    cfg.max_consecutive_bad = 20
    with pytest.raises(errors.BadInputError, match="20 bad records in a row"):
        next(make(cfg))


@pytest.mark.parametrize("text, match", [
    ('[{"id": 1}, {"id": ', "not a valid JSON list"),
    ('[{"id": 1}', "ends before"),
    ('[{"id": 1},]', "trailing comma"),
    ('[{"id": 1}] extra', "data after"),
    ("[]", "no records"),
])
def test_malformed_json_list_files_are_refused_with_the_reason(text, match, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        make(llava_config(str(path), tmp_path))


def test_a_question_longer_than_question_len_is_kept_and_counted(tmp_path):
    png(tmp_path / "a.png", 10)
    png(tmp_path / "b.png", 20)
    long_q = "<image>\n" + " ".join(["what color is the circle?"] * 6)    # 30 words + '?'s, over question_len 16
    lines = [{"id": "long", "image": "a.png", "conversations": conv(long_q)},
             {"id": "short", "image": "b.png", "conversations": GOOD_CONV}]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = llava_config(str(path), tmp_path, "error")     # counted even under 'error': the example is usable
    cfg.seq_len = 96
    it = make(cfg, batch_size=2)
    batch = next(it)
    assert len(batch["tokens"]) == 2 and "input_note" not in batch
    assert dict(it.bad_input.counts) == {errors.QUESTION_TRUNCATED: 1}
    (example,) = it.bad_input.examples[errors.QUESTION_TRUNCATED]
    assert example.startswith("long: question of") and "data.question_len=16" in example
