"""Prompt datasets: every file format, keys, chat template, bad rows (named or counted), resumable order."""
import json

import datasets
import pytest

from vespo_megatron.data import PromptDataConfig, PromptDataError, PromptDataset, PromptOrder
from vespo_megatron.data.arithmetic import arithmetic_rows, build_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


ROWS = [{"prompt": "What is 1+2?", "label": "3", "meta": {"id": 0}},
        {"prompt": "What is 10+5?", "label": "15", "meta": {"id": 1}}]


def _write(fmt, rows, tmp_path):
    if fmt == "jsonl":
        return str(write_jsonl(rows, tmp_path / "p.jsonl"))
    ds = datasets.Dataset.from_list(rows)
    if fmt == "parquet":
        ds.to_parquet(str(tmp_path / "p.parquet"))
        return str(tmp_path / "p.parquet")
    if fmt == "disk":
        ds.save_to_disk(str(tmp_path / "saved"))
        return str(tmp_path / "saved")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    return str(tmp_path / "saved_dict")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "disk", "disk_dict"])
def test_each_format_gives_the_same_prompts(fmt, tmp_path, tok):
    path = _write(fmt, ROWS, tmp_path)
    ds = PromptDataset.load(PromptDataConfig(path, input_key="prompt", label_key="label", metadata_key="meta"), tok)
    assert len(ds) == 2
    assert [p.label for p in ds.prompts] == ["3", "15"]
    assert [p.metadata for p in ds.prompts] == [{"id": 0}, {"id": 1}]
    assert ds[0].ids == tok("What is 1+2?")["input_ids"]
    assert tok.decode(ds[1].ids) == "What is 10+5?"


def test_chat_template_ids_match_the_tokenizer(tmp_path, tok):
    path = _write("jsonl", ROWS, tmp_path)
    ds = PromptDataset.load(PromptDataConfig(path, label_key="label", apply_chat_template=True), tok)
    expected = tok.apply_chat_template([{"role": "user", "content": "What is 1+2?"}], tokenize=True,
                                       add_generation_prompt=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ds[0].ids == list(expected)
    assert ds[0].ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ds[0].text.endswith("<|im_start|>assistant\n")


def test_message_lists_and_nested_keys_as_in_dapo_math(tmp_path, tok):
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
             "reward_model": {"ground_truth": "4", "style": "rule"}, "extra_info": json.dumps({"index": 7})}]
    path = _write("parquet", rows, tmp_path)
    cfg = PromptDataConfig(path, label_key="reward_model.ground_truth", metadata_key="extra_info",
                           apply_chat_template=True)
    ds = PromptDataset.load(cfg, tok)
    assert ds[0].label == "4" and ds[0].metadata == {"index": 7}
    assert ds[0].text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    with pytest.raises(PromptDataError, match="row 0: 'prompt'.*--apply-chat-template"):
        PromptDataset.load(PromptDataConfig(path, label_key="reward_model.ground_truth"), tok)


BAD = [
    ({"label": "1"}, "prompt", "missing_key"),  # missing input key in this row
    ({"prompt": "   ", "label": "1"}, "empty prompt", "empty_prompt"),
    ({"prompt": "What is 1+1?"}, "'label': missing", "missing_key"),
    ({"prompt": 17, "label": "1"}, "neither text nor chat messages", "undecodable"),
    ({"prompt": "What is 1+1?", "label": "2", "meta": "not json"}, "metadata is not JSON", "undecodable"),
]


@pytest.mark.parametrize("bad, message, reason", BAD)
def test_bad_rows_are_named_or_counted(bad, message, reason, tmp_path, tok):
    rows = [dict(ROWS[0], meta=json.dumps(ROWS[0]["meta"])), bad]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PromptDataConfig(str(path), label_key="label", metadata_key="meta" if "meta" in bad else None)
    with pytest.raises(PromptDataError, match=f"bad.jsonl: row 1: .*{message}"):
        PromptDataset.load(cfg, tok)
    ds = PromptDataset.load(PromptDataConfig(**{**cfg.__dict__, "bad_rows": "skip"}), tok)
    assert len(ds) == 1 and ds.filtered == {reason: 1}


@pytest.mark.parametrize("line", [b"{not json\n", b'{"prompt": "\xff\xfe"}\n', b"[1, 2]\n"])
def test_undecodable_jsonl_lines_are_named_or_counted(line, tmp_path, tok):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + json.dumps(ROWS[1]).encode() + b"\n" + line)
    with pytest.raises(PromptDataError, match="u.jsonl: row 2: undecodable"):
        PromptDataset.load(PromptDataConfig(str(path), label_key="label"), tok)
    ds = PromptDataset.load(PromptDataConfig(str(path), label_key="label", bad_rows="skip"), tok)
    assert [p.label for p in ds.prompts] == ["3", "15"] and ds.filtered == {"undecodable": 1}


def test_over_length_prompts_are_filtered_and_counted(tmp_path, tok, caplog):
    path = _write("jsonl", ROWS, tmp_path)  # 12 and 13 characters = tokens
    with caplog.at_level("INFO"):
        ds = PromptDataset.load(PromptDataConfig(path, label_key="label", max_prompt_len=12), tok)
    assert [p.row for p in ds.prompts] == [0] and ds.filtered == {"over_length": 1}
    assert "1 of 2 rows dropped (over_length: 1)" in caplog.text
    with pytest.raises(PromptDataError, match="no usable prompt.*over_length"):
        PromptDataset.load(PromptDataConfig(path, label_key="label", max_prompt_len=5), tok)


def test_file_level_errors_name_the_file_and_flag(tmp_path, tok):
    path = _write("jsonl", ROWS, tmp_path)
    with pytest.raises(PromptDataError, match="--input-key 'question' is not a column"):
        PromptDataset.load(PromptDataConfig(path, input_key="question"), tok)
    with pytest.raises(PromptDataError, match="no such file"):
        PromptDataset.load(PromptDataConfig(str(tmp_path / "nope.jsonl")), tok)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(PromptDataError, match="x.csv: unknown format"):
        PromptDataset.load(PromptDataConfig(str(tmp_path / "x.csv")), tok)
    with pytest.raises(ValueError, match="--prompt-data-bad-rows"):
        PromptDataConfig(path, bad_rows="ignore").validate()


def test_order_epochs_shuffle_and_resume():
    plain = PromptOrder(5)
    assert plain.take(7) == [0, 1, 2, 3, 4, 0, 1] and plain.epoch == 1
    a = PromptOrder(6, shuffle=True, seed=3)
    first = a.take(6)
    assert sorted(first) == list(range(6)) and first != list(range(6))
    second = a.take(6)
    assert sorted(second) == list(range(6)) and second != first  # reshuffled each epoch
    full = PromptOrder(6, shuffle=True, seed=3).take(16)
    b = PromptOrder(6, shuffle=True, seed=3)
    b.take(9)
    resumed = PromptOrder(6, shuffle=True, seed=3)
    resumed.load_state_dict(b.state_dict())
    assert resumed.take(7) == full[9:]  # the next unseen prompts
    with pytest.raises(ValueError, match="seed=3.*same --prompt-data"):
        PromptOrder(6, shuffle=True, seed=4).load_state_dict(b.state_dict())


def test_generated_arithmetic_set_through_the_dataset(tmp_path, tok):
    rows = arithmetic_rows(20, seed=0)
    assert rows[0]["label"] == f"\\boxed{{{rows[0]['metadata']['a'] + rows[0]['metadata']['b']}}}"
    ds = PromptDataset.load(PromptDataConfig(str(write_jsonl(rows, tmp_path / "a.jsonl")), label_key="label",
                                             metadata_key="metadata", apply_chat_template=True), tok)
    assert len(ds) == 20 and all(p.ids[-1] == tok("\n")["input_ids"][0] for p in ds.prompts)


def test_dataset_prompts_resume_with_the_next_unseen_prompt(tmp_path, tok):
    from vespo_megatron.data.stream import DatasetPrompts

    rows = arithmetic_rows(7, seed=1)
    ds = PromptDataset.load(PromptDataConfig(str(write_jsonl(rows, tmp_path / "a.jsonl")), label_key="label"), tok)
    full = [p.row for p in DatasetPrompts(ds, shuffle=True, seed=5).take(12)]
    first = DatasetPrompts(ds, shuffle=True, seed=5)
    assert [p.row for p in first.take(4)] == full[:4]
    state = first.state_dict()
    resumed = DatasetPrompts(ds, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    assert [p.row for p in resumed.take(8)] == full[4:] and resumed.epoch == 1
