import json
import types

import pytest

from hf_gradext.data import build_datasets, default_block_size, load_raw_datasets
from hf_gradext.data.corpus import embedded_documents
from hf_gradext.data.loading import file_builder
from hf_gradext.errors import UserFacingError


def ns(**kw):
    base = {"validation_split_percentage": 5}
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_embedded_split_is_run_clm_style():
    raw = load_raw_datasets(ns(validation_split_percentage=10))
    docs = embedded_documents()
    n_val = len(docs) * 10 // 100
    assert raw["validation"]["text"] == list(docs[:n_val])
    assert raw["train"]["text"] == list(docs[n_val:])
    assert load_raw_datasets(ns(validation_split_percentage=0))["validation"] is None


@pytest.mark.parametrize("ext", ["txt", "json", "jsonl", "csv"])
def test_local_file_formats(tmp_path, ext):
    lines = [f"Story number {i} is about a cat." for i in range(40)]
    path = tmp_path / f"data.{ext}"
    if ext == "txt":
        path.write_text("\n".join(lines) + "\n")
    elif ext in ("json", "jsonl"):
        path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(lines)) + "\n")
    else:
        path.write_text("id,text\n" + "\n".join(f'{i},"{t}"' for i, t in enumerate(lines)) + "\n")
    raw = load_raw_datasets(ns(train_file=str(path), validation_split_percentage=25))
    assert len(raw["validation"]) == 10 and len(raw["train"]) == 30
    assert raw["train"][0]["text"].strip() == lines[10]


def test_validation_file_is_used_instead_of_a_split(tmp_path):
    (tmp_path / "t.txt").write_text("a b c\n" * 20)
    (tmp_path / "v.txt").write_text("d e f\n" * 4)
    raw = load_raw_datasets(ns(train_file=str(tmp_path / "t.txt"), validation_file=str(tmp_path / "v.txt")))
    assert len(raw["train"]) == 20 and len(raw["validation"]) == 4


def test_file_errors(tmp_path):
    with pytest.raises(UserFacingError, match="does not exist"):
        load_raw_datasets(ns(train_file=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserFacingError, match="is empty"):
        load_raw_datasets(ns(train_file=str(tmp_path / "empty.txt")))
    with pytest.raises(UserFacingError, match="unsupported file type"):
        file_builder("data.parquet", "--train_file")


def test_unreachable_hub_dataset_is_one_line_error():
    with pytest.raises(UserFacingError) as info:
        load_raw_datasets(ns(dataset_name="no-such-org/no-such-dataset"))
    assert "\n" not in str(info.value) and "--dataset_name 'no-such-org/no-such-dataset'" in str(info.value)


def test_local_dataset_directory_as_dataset_name(tmp_path):
    (tmp_path / "train.txt").write_text("hello there\n" * 30)
    raw = load_raw_datasets(ns(dataset_name=str(tmp_path), validation_split_percentage=10))
    assert len(raw["train"]) == 27 and len(raw["validation"]) == 3


def test_build_datasets_embedded(tiny_tokenizer):
    train, val = build_datasets(ns(max_train_samples=20, max_eval_samples=4), tiny_tokenizer, block_size=32)
    assert len(train) == 20 and len(val) == 4
    assert all(len(x) == 32 for x in train["input_ids"])
    assert train["example_id"] == list(range(20))


def test_default_block_size(tiny_tokenizer):
    assert default_block_size(tiny_tokenizer) == 1024
    assert default_block_size(tiny_tokenizer, max_positions=256) == 256


def test_missing_local_dataset_folder_is_not_a_hub_failure(tmp_path):
    with pytest.raises(UserFacingError) as info:
        load_raw_datasets(ns(dataset_name=str(tmp_path / "gone")))
    assert "no such local directory" in str(info.value) and "Hub (" not in str(info.value)


def test_offline_uncached_hub_dataset_says_it_is_not_in_the_cache(tmp_path):
    # The suite runs with HF_HUB_OFFLINE=1 (conftest).
    with pytest.raises(UserFacingError) as info:
        load_raw_datasets(ns(dataset_name="no-such-org/no-such-dataset", cache_dir=str(tmp_path)))
    msg = str(info.value)
    assert "\n" not in msg and "not in the local datasets cache" in msg and "HF_HUB_OFFLINE=1" in msg
