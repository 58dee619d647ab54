"""`write_llava`: synthetic examples as a LLaVA-format dataset on disk, to check the LLaVA reader against them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from PIL import Image

from vlm_jax.data.synthetic.example import Example, prompt_text


def write_llava(out_dir: str | os.PathLike, examples: Sequence[Example], *, json_name: str = "data.json") -> str:
    """Writes examples in the LLaVA format (PNG images + a JSON list) and returns the JSON path.

    Records: {"id", "image": "images/<id>.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": answer}]}; image paths are relative to `out_dir` (the LLaVA image folder).
    """
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for ex in examples:
        rel = os.path.join("images", f"{ex.id}.png")
        Image.fromarray(ex.image).save(os.path.join(out_dir, rel))
        records.append({"id": ex.id, "image": rel, "conversations": [
            {"from": "human", "value": prompt_text(ex.question)}, {"from": "gpt", "value": ex.answer}]})
    path = os.path.join(out_dir, json_name)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    return path
