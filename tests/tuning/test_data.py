"""Calibration data: every documented form parses; bad inputs fail with clear messages."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from tuning_helpers import char_tokenizer, one_thread  # noqa: F401  (fixtures)

from hf_autoround.tuning import data as calib
from hf_autoround.tuning.data import get_calibration_data, parse_source

SEQ = 16


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def long_text(i, n=40):
    return f"sample {i} " + "x" * n


def test_txt_one_sample_per_line(tmp_path, char_tokenizer):
    path = _write(tmp_path / "a.txt", "\n".join(long_text(i) for i in range(5)))
    data = get_calibration_data(path, char_tokenizer, SEQ, 10)
    assert data.input_ids.shape == (5, SEQ)
    assert data.attention_mask is None


def test_txt_paragraphs_when_blank_lines(tmp_path, char_tokenizer):
    text = "\n\n".join(long_text(i, 5) + "\n" + "y" * 30 for i in range(3))  # each paragraph spans 2 lines
    data = get_calibration_data(_write(tmp_path / "p.txt", text), char_tokenizer, SEQ, 10)
    assert data.nsamples == 3


def test_json_jsonl_text_and_messages(tmp_path, char_tokenizer):
    j = _write(tmp_path / "a.json", json.dumps([{"text": long_text(i)} for i in range(3)] + [long_text(9)]))
    assert get_calibration_data(j, char_tokenizer, SEQ, 10).nsamples == 4
    jl = _write(tmp_path / "b.jsonl", "\n".join(json.dumps({"text": long_text(i)}) for i in range(2)))
    assert get_calibration_data(jl, char_tokenizer, SEQ, 10).nsamples == 2
    chat = [{"messages": [{"role": "user", "content": "hello there friend"}]}]
    ch = _write(tmp_path / "c.jsonl", json.dumps(chat[0]))
    ids = get_calibration_data(ch, char_tokenizer, SEQ, 10).input_ids[0]
    assert bytes(ids.tolist()).decode() == "<user>hello there friend</user>"[:SEQ]


def test_lists_of_strings_tensors_dicts(char_tokenizer):
    assert get_calibration_data([long_text(i) for i in range(3)], char_tokenizer, SEQ, 10).nsamples == 3
    tensors = [torch.arange(20) + i for i in range(4)]
    data = get_calibration_data(tensors, None, SEQ, 10)
    assert data.input_ids[:, 0].tolist() == [0, 1, 2, 3]  # a list keeps its order
    ids_2d = torch.arange(60).reshape(3, 20)
    assert get_calibration_data(ids_2d, None, SEQ, 10).nsamples == 3
    mask = torch.ones(20, dtype=torch.long)
    mask[-6:] = 0
    dicts = [{"input_ids": torch.arange(20), "attention_mask": mask}, {"input_ids": list(range(20))}]
    data = get_calibration_data(dicts, None, SEQ, 10)
    assert data.attention_mask is not None and data.attention_mask[0].tolist() == [1] * 14 + [0] * 2
    assert data.attention_mask[1].all()


def test_nsamples_caps_and_seed_picks(tmp_path, char_tokenizer):
    texts = _write(tmp_path / "many.txt", "\n".join(long_text(i) for i in range(20)))
    a = get_calibration_data(texts, char_tokenizer, SEQ, 5, seed=1)
    b = get_calibration_data(texts, char_tokenizer, SEQ, 5, seed=1)
    c = get_calibration_data(texts, char_tokenizer, SEQ, 5, seed=2)
    assert a.nsamples == 5 and torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)


def test_combination_syntax(tmp_path, char_tokenizer):
    a = _write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": "a" * 40}) for _ in range(10)))
    b = _write(tmp_path / "b.txt", "\n".join("b" * 40 for _ in range(10)))
    data = get_calibration_data(f"{a}:num=3,{b}:num=2", char_tokenizer, SEQ, 100)
    firsts = [chr(row[1]) for row in data.input_ids.tolist()]  # row[0] is the BOS id 1
    assert firsts == ["a"] * 3 + ["b"] * 2


def test_parse_source_options():
    spec = parse_source("d.jsonl:num=7:concat=True:apply_chat_template:system_prompt=Be brief")
    assert (spec.source, spec.num, spec.concat, spec.apply_chat_template, spec.system_prompt) == \
        ("d.jsonl", 7, True, True, "Be brief")
    assert parse_source("d.txt:concat=false").concat is False


def test_concat_joins_short_samples(tmp_path, char_tokenizer):
    path = _write(tmp_path / "short.txt", "\n".join("abcdef" for _ in range(20)))
    data = get_calibration_data(f"{path}:concat=True", char_tokenizer, SEQ, 100)
    assert data.nsamples == (20 * 8) // SEQ  # 1 BOS + 6 chars + 1 EOS per sample
    assert 0 in data.input_ids[0].tolist()  # EOS between samples


def test_chat_template_with_system_prompt(tmp_path, char_tokenizer):
    path = _write(tmp_path / "t.txt", "a question that is long enough\n")
    data = get_calibration_data(f"{path}:apply_chat_template:system_prompt=S", char_tokenizer, 20, 1)
    assert bytes(data.input_ids[0].tolist()).decode() == "<system>S</system><u"


def test_short_samples_dropped_and_logged(char_tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="hf_autoround.tuning.data"):
        data = get_calibration_data(["tiny", long_text(1), "no"], char_tokenizer, SEQ, 10)
    assert data.nsamples == 1
    assert "dropped 2 samples" in caplog.text


def test_default_dataset_is_bundled(char_tokenizer):
    data = get_calibration_data(None, char_tokenizer, 64, 4)
    assert data.input_ids.shape == (4, 64)
    assert calib.BUNDLED_CALIB.endswith("calib_wiki.txt")


@pytest.mark.parametrize("dataset, error, words", [
    ([], ValueError, "empty list"),
    ("", ValueError, "names no data"),
    (["tiny", "also tiny"], ValueError, "concat=True"),
    ("missing_file.jsonl", FileNotFoundError, "does not exist"),
    (42, TypeError, "not supported"),
    ([{"title": "no text field"}], ValueError, "'text', 'messages' or 'input_ids'"),
])
def test_bad_inputs_fail_clearly(dataset, error, words, char_tokenizer):
    with pytest.raises(error, match=words):
        get_calibration_data(dataset, char_tokenizer, SEQ, 4)


def test_text_without_tokenizer_fails():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        get_calibration_data(["some text that is long enough"], None, 4, 1)


def test_bad_options_and_extensions(tmp_path, char_tokenizer):
    with pytest.raises(ValueError, match="unknown option 'nun'"):
        get_calibration_data("a.txt:nun=3", char_tokenizer, SEQ, 4)
    with pytest.raises(ValueError, match="positive int"):
        get_calibration_data("a.txt:num=x", char_tokenizer, SEQ, 4)
    csv = _write(tmp_path / "a.csv", "x")
    with pytest.raises(ValueError, match="unknown extension"):
        get_calibration_data(csv, char_tokenizer, SEQ, 4)
    empty = _write(tmp_path / "e.txt", "\n\n")
    with pytest.raises(ValueError, match="holds no samples"):
        get_calibration_data(empty, char_tokenizer, SEQ, 4)


def test_hub_name_offline_fails_at_once(monkeypatch, char_tokenizer):
    monkeypatch.setattr(calib, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="Pass a local file instead"):
        get_calibration_data("NeelNanda/pile-10k", char_tokenizer, SEQ, 4)
