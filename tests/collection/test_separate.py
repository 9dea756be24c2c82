import json

import pytest
import torch

from hf_gradext.collection.separate import eval_fp32, read_probe_texts
from hf_gradext.errors import UserFacingError
from tests.collection._tiny import tiny_gpt2


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("p.txt", "first text\n\nsecond text\n"),
        ("p.jsonl", '{"text": "first text"}\n{"text": "second text"}\n'),
        ("p.json", json.dumps(["first text", "second text"])),
        ("q.json", json.dumps([{"text": "first text"}, {"text": "second text"}])),
    ],
)
def test_read_probe_texts_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert read_probe_texts(path) == ["first text", "second text"]


def test_read_probe_texts_rejects_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(UserFacingError, match="--gradient_collection_probe_file"):
        read_probe_texts(path)


def test_eval_fp32_restores_training_mode_and_disables_autocast():
    model = tiny_gpt2()
    with torch.autocast("cpu", dtype=torch.bfloat16), eval_fp32(model):
        assert not model.training
        assert model.transformer.h[0].mlp.c_fc(torch.randn(2, 32)).dtype == torch.float32
    assert model.training
