"""`write_llava`: synthetic examples as a LLaVA-format dataset on disk, to check the LLaVA reader against them."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

from PIL import Image

from vlm_jax import files
from vlm_jax.data.synthetic.example import Example, prompt_text


def write_llava(out_dir: str | os.PathLike, examples: Sequence[Example], *, json_name: str = "data.json") -> str:
    """Writes examples in the LLaVA format (PNG images + a JSON list) and returns the JSON path.

    Records: {"id", "image": "images/<id>.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": answer}]}; image paths are relative to `out_dir` (the LLaVA image folder), which may
    be a gs:// folder.
    """
    out_dir = os.fspath(out_dir)
    records = []
    for ex in examples:
        rel = os.path.join("images", f"{ex.id}.png")
        png = io.BytesIO()
        Image.fromarray(ex.image).save(png, format="PNG")
        files.write_bytes_atomic(os.path.join(out_dir, rel), png.getvalue())
        records.append({"id": ex.id, "image": rel, "conversations": [
            {"from": "human", "value": prompt_text(ex.question)}, {"from": "gpt", "value": ex.answer}]})
    path = os.path.join(out_dir, json_name)
    files.write_text_atomic(path, json.dumps(records, indent=1))
    return path
