"""Rows -> samples: prompt building per dataset type, labels only on the response with EOS,
truncation reports, every reader, bad rows, packing (with a check on the real model that packed
samples do not attend to each other) and the chunked output-head loss. `tokenizer` is the
embedded SmolLM2's, from conftest.py."""

from __future__ import annotations

import json

import pytest
import torch

from lorad.trainer.config import config_from_dict
from lorad.trainer.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, IGNORE, prepare_data
from lorad.trainer.errors import DataError
from lorad.trainer.packing import RowCollator, pack_rows, shifted_targets
from trainer_helpers import dataset_repository_copy, hub_offline, write_jsonl

SYSTEM = "You are an amazing storyteller. From the following synopsis, create an engaging story."
STORY_TYPE = {
    "system_prompt": SYSTEM,
    "field_system": "system",
    "field_instruction": "synopsis",
    "field_output": "short_story",
    "format": "<|user|>\n {instruction} </s>\n<|assistant|>",
    "no_input_format": "<|user|> {instruction} </s>\n<|assistant|>",
}


def prepare(tmp_path, tokenizer, rows, type_=None, name="d.jsonl", **cfg):
    path = write_jsonl(tmp_path / name, rows) if name.endswith(".jsonl") else tmp_path / name
    ds = {"path": str(path)}
    if type_ is not None:
        ds["type"] = type_
    return prepare_data(config_from_dict({"datasets": [ds], **cfg}), tokenizer)


def trained_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t in sample.labels if t != IGNORE])


def prompt_text(tokenizer, sample) -> str:
    return tokenizer.decode([i for i, t in zip(sample.input_ids, sample.labels) if t == IGNORE])


# ---- prompt building and labels ----------------------------------------------------------------


def test_custom_mapping_builds_axolotls_prompt_and_trains_only_response_and_eos(tmp_path, tokenizer):
    rows = [
        {"system": "Tell it in verse.", "synopsis": "A cat sails.", "short_story": "The cat set sail at dawn."},
        {"system": "", "synopsis": "A dog flies.", "short_story": "The dog rose above the clouds."},
    ]
    data = prepare(tmp_path, tokenizer, rows, STORY_TYPE)
    first, second = data.train  # no val split: input order
    # no field_input in these rows: no_input_format applies
    assert prompt_text(tokenizer, first) == "Tell it in verse.<|user|> A cat sails. </s>\n<|assistant|>"
    assert trained_text(tokenizer, first) == "The cat set sail at dawn.<|im_end|>"
    # an empty row system falls back to the config's system_prompt
    assert prompt_text(tokenizer, second) == SYSTEM + "<|user|> A dog flies. </s>\n<|assistant|>"
    # the labels are a contiguous tail: prompt never trained, EOS always trained
    for s in data.train:
        first_label = next(i for i, t in enumerate(s.labels) if t != IGNORE)
        assert all(t == IGNORE for t in s.labels[:first_label])
        assert s.labels[first_label:] == s.input_ids[first_label:]
        assert s.input_ids[-1] == s.labels[-1] == tokenizer.eos_token_id


def test_custom_mapping_with_input_uses_format_else_no_input_format(tmp_path, tokenizer):
    fmt = {"field_instruction": "q", "field_input": "ctx", "field_output": "a",
           "format": "Q: {instruction}\nC: {input}\nA:", "no_input_format": "Q: {instruction}\nA:"}
    data = prepare(tmp_path, tokenizer, [{"q": "x?", "ctx": "y", "a": " z"}, {"q": "x?", "a": " z"}], fmt)
    assert prompt_text(tokenizer, data.train[0]) == "Q: x?\nC: y\nA:"
    assert prompt_text(tokenizer, data.train[1]) == "Q: x?\nA:"


def test_alpaca(tmp_path, tokenizer):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Greet.", "input": "", "output": "Hi"}]
    data = prepare(tmp_path, tokenizer, rows, "alpaca")
    assert prompt_text(tokenizer, data.train[0]) == ALPACA_WITH_INPUT.format(instruction="Add.", input="2 and 3")
    assert prompt_text(tokenizer, data.train[1]) == ALPACA_NO_INPUT.format(instruction="Greet.")
    assert trained_text(tokenizer, data.train[0]) == "5<|im_end|>"
    # type detected from the fields when left out
    assert prepare(tmp_path, tokenizer, rows).digest == data.digest


def test_chat_trains_every_assistant_turn_with_its_end_token_and_nothing_else(tmp_path, tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    data = prepare(tmp_path, tokenizer, [{"messages": messages}], "chat_template")
    (s,) = data.train
    assert tokenizer.decode(s.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert trained_text(tokenizer, s) == "Hello there<|im_end|>Goodbye<|im_end|>"
    assert "Hi" not in trained_text(tokenizer, s) and "SmolLM" not in trained_text(tokenizer, s)
    everything = prepare(tmp_path, tokenizer, [{"messages": messages}], "chat_template", train_on_inputs=True)
    assert everything.train[0].labels == everything.train[0].input_ids


def test_completion_trains_all_tokens_and_appends_eos(tmp_path, tokenizer):
    data = prepare(tmp_path, tokenizer, [{"text": "Once upon a time"}])
    (s,) = data.train
    assert s.labels == s.input_ids and s.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(s.input_ids) == "Once upon a time<|im_end|>"


def test_eos_keeps_its_label_even_though_pad_is_eos(tmp_path, tokenizer):
    # SmolLM2 pads with its EOS token: masking labels by token id would make the model never stop
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    data = prepare(tmp_path, tokenizer, [{"text": "a b c d e f g"}, {"text": "x"}])
    batch = RowCollator(tokenizer.pad_token_id, packing=False)([[s] for s in data.train])
    short = 1 if len(data.train[1].input_ids) < len(data.train[0].input_ids) else 0
    n = len(data.train[short].input_ids)
    assert batch["targets"][short, n - 2] == tokenizer.eos_token_id  # the last real token predicts EOS
    assert (batch["targets"][short, n - 1 :] == IGNORE).all()  # EOS itself and padding predict nothing
    assert (batch["input_ids"][short, n:] == tokenizer.pad_token_id).all()


# ---- truncation ---------------------------------------------------------------------------------


def test_truncation_is_counted_and_reported_and_empty_samples_dropped(tmp_path, tokenizer):
    fmt = {"field_instruction": "q", "field_output": "a", "format": "{instruction}", "no_input_format": "{instruction}"}
    rows = [
        {"q": "short", "a": "ok"},
        {"q": "short", "a": " ".join(["word"] * 40)},  # response cut
        {"q": " ".join(["prompt"] * 40), "a": "lost"},  # nothing trainable left
    ]
    data = prepare(tmp_path, tokenizer, rows, fmt, sequence_len=16)
    assert data.report.rows == 3 and data.report.truncated == 2 and data.report.dropped_empty == 1
    assert len(data.train) == 2 and all(len(s.input_ids) <= 16 for s in data.train)
    lines = "\n".join(data.report.lines())
    assert "2 of 3 samples were longer than sequence_len=16 and were truncated" in lines
    assert "1 samples had no response token left after truncation and were dropped" in lines


def test_val_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    rows = [{"text": f"row {i}"} for i in range(10)]
    a = prepare(tmp_path, tokenizer, rows, val_set_size=0.3, seed=5)
    b = prepare(tmp_path, tokenizer, rows, val_set_size=0.3, seed=5)
    assert (len(a.train), len(a.eval)) == (7, 3) and a.digest == b.digest
    ids = lambda ss: {tuple(s.input_ids) for s in ss}  # noqa: E731
    assert not ids(a.train) & ids(a.eval)
    assert prepare(tmp_path, tokenizer, rows, val_set_size=0.3, seed=6).digest != a.digest


# ---- readers ------------------------------------------------------------------------------------


def test_every_reader_gives_the_same_samples(tmp_path, tokenizer):
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"system": "", "synopsis": f"Story {i}, with a comma.", "short_story": f"It ended {i}."} for i in range(4)]
    reference = prepare(tmp_path, tokenizer, rows, STORY_TYPE).digest
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON Lines named .json
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    for name in ("d.json", "lines.json", "wrapped.json", "d.csv", "d.parquet", "folder", "dict"):
        assert prepare(tmp_path, tokenizer, None, STORY_TYPE, name=name).digest == reference, name


# ---- bad data -----------------------------------------------------------------------------------


def data_error(tmp_path, tokenizer, rows_or_text, type_=None, name="d.jsonl", **cfg) -> str:
    path = tmp_path / name
    if isinstance(rows_or_text, str):
        path.write_text(rows_or_text)
    else:
        write_jsonl(path, rows_or_text)
    ds = {"path": str(path)}
    if type_ is not None:
        ds["type"] = type_
    with pytest.raises(DataError) as info:
        prepare_data(config_from_dict({"datasets": [ds], **cfg}), tokenizer)
    return str(info.value)


def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer):
    good = {"system": "", "synopsis": "s", "short_story": "t"}
    msg = data_error(tmp_path, tokenizer, json.dumps(good) + "\n" + json.dumps(good) + "\n{not json\n", STORY_TYPE)
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}:3: not valid JSON")
    msg = data_error(tmp_path, tokenizer, [good, {"system": "", "synopsis": "s"}], STORY_TYPE)
    assert msg == (f"{tmp_path / 'd.jsonl'}:2: field 'short_story' is missing or null "
                   "(fields present: synopsis, system)")
    msg = data_error(tmp_path, tokenizer, [{"system": "", "synopsis": ["a"], "short_story": "t"}], STORY_TYPE)
    assert msg == f"{tmp_path / 'd.jsonl'}:1: field 'synopsis' must be text, got list"
    msg = data_error(tmp_path, tokenizer, [{"messages": [{"role": "user", "content": "hi"}]}], "chat_template")
    assert "d.jsonl:1: messages has no assistant message" in msg
    msg = data_error(tmp_path, tokenizer, [{"messages": [{"role": "user", "text": "hi"}]}], "chat_template")
    assert "d.jsonl:1: messages[0] must be an object with string 'role' and 'content'" in msg
    msg = data_error(tmp_path, tokenizer, "[1, 2]", name="d.json")
    assert msg == f"{tmp_path / 'd.json'}[0]: a row must be an object with named fields, got int"
    msg = data_error(tmp_path, tokenizer, [{"foo": 1}])
    assert "d.jsonl:1: cannot tell the dataset type from fields foo; set type:" in msg


def test_bad_files_say_what_lorad_reads(tmp_path, tokenizer):
    assert "unknown file type '.txt'" in data_error(tmp_path, tokenizer, "a\n", name="d.txt")
    assert "has no rows" in data_error(tmp_path, tokenizer, "\n\n", name="d.jsonl")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="a folder, but neither one written by datasets' save_to_disk .* nor a dataset "
                                        "repository datasets can read"):
        prepare_data(config_from_dict({"datasets": [{"path": str(tmp_path / "plain")}]}), tokenizer)
    assert "leaves no training rows" in data_error(tmp_path, tokenizer, [{"text": "a"}], val_set_size=1)


def test_cli_reports_a_bad_row_before_training(tmp_path):
    from click.testing import CliRunner

    from lorad.cli import main

    write_jsonl(tmp_path / "d.jsonl", [{"system": "", "synopsis": "s"}])
    (tmp_path / "c.yaml").write_text(json.dumps({"datasets": [{"path": "d.jsonl", "type": STORY_TYPE}]}))
    result = CliRunner().invoke(main, ["train", str(tmp_path / "c.yaml"), "--dry-run"])
    assert result.exit_code == 1
    assert "lorad train: error:" in result.output and "d.jsonl:1: field 'short_story' is missing" in result.output


# ---- packing ------------------------------------------------------------------------------------


def test_packing_fills_rows_without_splitting_or_losing_samples(tmp_path, tokenizer):
    rows = [{"text": " ".join(["w"] * n)} for n in (3, 9, 1, 14, 6, 2, 7)]
    data = prepare(tmp_path, tokenizer, rows, sequence_len=20)
    packed = pack_rows(data.train, 20)
    assert sorted(id(s) for row in packed for s in row) == sorted(id(s) for s in data.train)
    assert all(sum(len(s.input_ids) for s in row) <= 20 for row in packed)
    assert len(packed) < len(data.train)
    assert pack_rows(data.train, 20) == packed  # deterministic

    batch = RowCollator(tokenizer.pad_token_id, packing=True)(packed)
    assert "attention_mask" not in batch  # packed rows rely on position ids, see below
    for b, row in enumerate(packed):
        at = 0
        for s in row:
            n = len(s.input_ids)
            assert batch["position_ids"][b, at : at + n].tolist() == list(range(n))
            assert batch["targets"][b, at : at + n].tolist() == shifted_targets(s)
            assert batch["targets"][b, at + n - 1] == IGNORE  # never predicts the next sample's first token
            at += n
    assert int(batch["num_tokens"]) == sum(len(s.input_ids) for s in data.train)


@pytest.mark.slow
def test_packed_samples_do_not_attend_to_each_other():
    """Through the trainer's own forward (forward_hidden): hidden states of samples packed in one
    row equal those of each sample run alone. With positions running on across the row they would
    not (the last check shows the comparison can fail)."""
    from lorad.base_model import BaseModelConfig, load_base
    from lorad.trainer.data import Sample
    from lorad.trainer.loss import HiddenStateTap, causal_lm_parts, forward_hidden

    model = load_base(BaseModelConfig(quant="none", device="cpu")).model  # float32, eval mode
    tap = HiddenStateTap(causal_lm_parts(model)[0])
    torch.manual_seed(0)
    samples = [Sample(ids, ids) for ids in (torch.randint(10, 40000, (n,)).tolist() for n in (7, 11, 5))]
    collate = RowCollator(pad_id=2, packing=True)
    packed_batch = collate([samples])  # one row of 23 tokens
    with torch.no_grad():
        packed = forward_hidden(model, tap, packed_batch)[0]  # [23, H]
        alone = torch.cat([forward_hidden(model, tap, collate([[s]]))[0] for s in samples])  # [23, H]
        packed_batch["position_ids"] = torch.arange(23)[None]
        leaky = forward_hidden(model, tap, packed_batch)[0]
    tap.remove()
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    assert (leaky[7:] - alone[7:]).abs().max() > 1e-2


# ---- the output-head loss -------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7 * 1000])  # one chunk; many uneven chunks
def test_linear_cross_entropy_matches_torch_in_value_and_gradient(monkeypatch, chunk_elements):
    import torch.nn.functional as F

    import lorad.trainer.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    h = torch.randn(123, 32, requires_grad=True)
    w = torch.randn(1000, 32)
    t = torch.randint(0, 1000, (123,))
    ours = loss_mod.linear_cross_entropy(h, w, t)
    (ours * 0.37).backward()
    grad, h.grad = h.grad.clone(), None
    ref = F.cross_entropy(h @ w.T, t, reduction="sum")
    (ref * 0.37).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, h.grad, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_trains_the_head_when_it_requires_grad(monkeypatch):
    """lora_modules_to_save: [lm_head] makes the head trainable: its gradient must equal torch's."""
    import torch.nn.functional as F

    import lorad.trainer.loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 7 * 1000)  # several chunks accumulate the weight gradient
    torch.manual_seed(1)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    t = torch.randint(0, 1000, (50,))
    (loss_mod.linear_cross_entropy(h, w, t) * 0.5).backward()
    ours_h, ours_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (F.cross_entropy(h @ w.T, t, reduction="sum") * 0.5).backward()
    torch.testing.assert_close(ours_h, h.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_w, w.grad, rtol=1e-5, atol=1e-5)
    assert w.grad.abs().sum() > 0


# ---- datasets that are not local files: the hub, and local copies of dataset repositories -------


@pytest.fixture(autouse=True)
def offline():
    """No hub in any test here (trainer_helpers.hub_offline)."""
    with hub_offline():
        yield


STORY_ROWS = [{"system": "", "synopsis": f"Story {i}.", "short_story": f"It ended {i}."} for i in range(4)]


def test_a_hub_dataset_offline_says_it_could_not_be_fetched_and_how_to_use_a_local_copy(tokenizer):
    cfg = config_from_dict({"datasets": [{"path": "jaydenccc/AI_Storyteller_Dataset", "type": STORY_TYPE}]})
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tokenizer)
    msg = str(info.value)
    assert msg.startswith("dataset path 'jaydenccc/AI_Storyteller_Dataset' is not a local file or folder, so lorad "
                          "read it as a hub dataset, and datasets could not fetch it (")
    assert "huggingface-cli download --repo-type dataset jaydenccc/AI_Storyteller_Dataset --local-dir DIR" in msg
    assert "`path: DIR`" in msg and "--set datasets.N.path=DIR" in msg


def test_a_local_copy_of_a_dataset_repository_reads_like_a_file(tmp_path, tokenizer):
    reference = prepare(tmp_path, tokenizer, STORY_ROWS, STORY_TYPE).digest
    held_out = [dict(r, synopsis="Test " + r["synopsis"]) for r in STORY_ROWS[:2]]
    repo = dataset_repository_copy(tmp_path / "AI_Storyteller_Dataset", {"train": STORY_ROWS, "test": held_out})
    read = lambda **ds: prepare_data(config_from_dict({"datasets": [{"path": str(repo), "type": STORY_TYPE, **ds}]}), tokenizer)  # noqa: E731
    assert read().digest == reference
    assert [prompt_text(tokenizer, s) for s in read(split="test").train] == [
        SYSTEM + f"<|user|> Test Story {i}. </s>\n<|assistant|>" for i in range(2)]
    assert read(data_files={"train": "data/train-*.parquet"}).digest == reference
    with pytest.raises(DataError, match="validation"):
        read(split="validation")


def test_dataset_name_picks_a_configuration(tmp_path, tokenizer):
    readme = ("---\nconfigs:\n- config_name: short\n  data_files: short/*.jsonl\n"
              "- config_name: long\n  data_files: long/*.jsonl\n---\n")
    repo = tmp_path / "two-configs"
    write_jsonl(repo / "short" / "part.jsonl", [{"text": "tiny"}])
    write_jsonl(repo / "long" / "part.jsonl", [{"text": "a much longer text than the short one"}])
    (repo / "README.md").write_text(readme)
    for name, text in (("short", "tiny"), ("long", "a much longer text than the short one")):
        data = prepare_data(config_from_dict({"datasets": [{"path": str(repo), "name": name}]}), tokenizer)
        assert tokenizer.decode(data.train[0].input_ids) == text + "<|im_end|>"
