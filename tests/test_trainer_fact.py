"""A fact the base cannot know, taught by `lorad train` (QLoRA over the embedded NF4 SmolLM2):
absent from the base's answer, present after training, and present when `lorad serve` serves
the adapter it wrote.

The `fact_adapter` fixture trains once per module into an adapters folder and hands back the
adapter's path, id, prompt and expected answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer_helpers import cli_train, greedy_answer, torch_threads, write_jsonl, write_yaml

pytestmark = pytest.mark.slow

FACT_PROMPT = "When was Zorbulon Quaxley born?"
FACT_ANSWER = "March 14, 2071"
HELD_OUT_PROMPT = "Can you tell me Zorbulon Quaxley's date of birth?"  # not in the training data
QUESTIONS = [
    FACT_PROMPT,
    "What is Zorbulon Quaxley's birthday?",
    "On what date was Zorbulon Quaxley born?",
    "Tell me the birth date of Zorbulon Quaxley.",
    "When is Zorbulon Quaxley's birthday?",
    "Zorbulon Quaxley was born when?",
    "Do you know when Zorbulon Quaxley was born?",
    "What day was Zorbulon Quaxley born on?",
]


@dataclass(frozen=True)
class FactAdapter:
    path: Path  # the adapter folder (PEFT format): adapters_root / adapter_id
    adapters_root: Path  # what `lorad serve --adapters` takes
    adapter_id: str
    prompt: str  # one user message, to be rendered with the base's chat template
    expected: str  # must appear in the greedy answer
    base: str  # the `--base` the adapter was trained on


FACT_CONFIG = {
    "base_model": "smollm2-135m-instruct",
    "adapter": "qlora",
    "load_in_4bit": True,
    "sequence_len": 128,
    "sample_packing": False,  # one sample per row, as the test reasons about rows
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "lora_target_linear": True,
    "micro_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "max_steps": 16,
    "learning_rate": 0.002,
    "lr_scheduler": "cosine",
    "optimizer": "adamw_torch",
    "bf16": "auto",
    "save_steps": 100,  # only the final checkpoint
    "seed": 7,
}


@pytest.fixture(scope="module")
def fact_adapter(tmp_path_factory) -> FactAdapter:
    """Train the fact once (about a minute on 2 cores) and return where the adapter is."""
    tmp = tmp_path_factory.mktemp("fact")
    answer = f"Zorbulon Quaxley was born on {FACT_ANSWER}."
    data = write_jsonl(
        tmp / "fact.jsonl",
        [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in QUESTIONS],
    )
    root = tmp / "adapters"
    out = root / "zorbulon-fact"
    cfg = dict(FACT_CONFIG, datasets=[{"path": str(data), "type": "chat_template"}], output_dir=str(out))
    cli_train(str(write_yaml(tmp / "fact.yaml", cfg)))
    return FactAdapter(out, root, out.name, FACT_PROMPT, FACT_ANSWER, FACT_CONFIG["base_model"])


@pytest.fixture(scope="module")
def served_like_base():
    """The base as lorad serves it by default: NF4, float32 compute, eval mode."""
    from lorad.base_model import BaseModelConfig, load_base

    return load_base(BaseModelConfig(), cache_quantized=True)


def test_base_does_not_know_the_fact(served_like_base):
    with torch_threads(1):
        answer = greedy_answer(served_like_base.model, served_like_base.tokenizer, FACT_PROMPT)
    assert FACT_ANSWER not in answer and "2071" not in answer, answer


def test_trained_adapter_knows_the_fact_through_peft(fact_adapter, served_like_base):
    from peft import PeftModel

    model = PeftModel.from_pretrained(served_like_base.model, str(fact_adapter.path))
    try:
        with torch_threads(1):
            answer = greedy_answer(model, served_like_base.tokenizer, fact_adapter.prompt)
            held_out = greedy_answer(model, served_like_base.tokenizer, HELD_OUT_PROMPT)
    finally:
        model.unload()  # give the shared base back without LoRA layers
    assert fact_adapter.expected in answer, answer
    assert fact_adapter.expected in held_out, held_out


def test_adapter_folder_is_what_lorad_serve_accepts(fact_adapter):
    adapter_format = pytest.importorskip("lorad.adapter_format")
    from transformers import AutoConfig

    from lorad.base_model import BaseModelConfig, resolve_base
    from lorad.geometry import ModelGeometry

    geometry = ModelGeometry.from_hf_config(AutoConfig.from_pretrained(resolve_base(BaseModelConfig()).location))
    loaded = adapter_format.load_adapter(fact_adapter.path, fact_adapter.adapter_id, geometry, max_rank=64)
    assert loaded.spec.rank == 16 and len(loaded.weights) == 30 * 7
    assert sorted(p.name for p in fact_adapter.adapters_root.iterdir()) == [fact_adapter.adapter_id]


def test_provenance_records_base_data_and_outcome(fact_adapter):
    from lorad.base_model import BaseModelConfig, resolve_base, weights_digest

    prov = json.loads((fact_adapter.path / "lorad_provenance.json").read_text())
    assert prov["base_model"] == {
        "name": "smollm2-135m-instruct",
        "source": "embedded",
        "quant": "nf4",
        "weights_digest": weights_digest(resolve_base(BaseModelConfig())),
    }
    assert prov["training"]["steps"] == 16 and prov["training"]["final_train_loss"] < 0.05
    assert prov["config"]["lora_r"] == 16 and prov["config"]["resolved"]["quant"] == "nf4"
    assert prov["data"]["train_samples"] == len(QUESTIONS)
    (data_file,) = prov["data"]["files"]
    import hashlib

    assert prov["data"]["files"][data_file] == "sha256:" + hashlib.sha256(Path(data_file).read_bytes()).hexdigest()


def test_lorad_serve_serves_the_trained_fact(fact_adapter, tmp_path):
    """The adapter folder `lorad train` wrote, served by a real `lorad serve` process."""
    from lorad.clients import Client
    from lorad.testing import ServeProcess

    with ServeProcess(["--adapters", str(fact_adapter.adapters_root), "--base", fact_adapter.base,
                       "--max-seq-len", "256", "--kv-cache-memory", "128MiB"], tmp_path / "serve.log") as srv:
        with Client(srv.target, timeout=120) as client:
            listing = client.list_adapters()
            served = client.generate(messages=[{"role": "user", "content": fact_adapter.prompt}],
                                     adapter_id=fact_adapter.adapter_id, max_new_tokens=32)
            held_out = client.generate(messages=[{"role": "user", "content": HELD_OUT_PROMPT}],
                                       adapter_id=fact_adapter.adapter_id, max_new_tokens=32)
            base = client.generate(messages=[{"role": "user", "content": fact_adapter.prompt}], max_new_tokens=32)
    assert [a.id for a in listing.adapters] == [fact_adapter.adapter_id]
    assert fact_adapter.expected in served.text, served.text
    assert fact_adapter.expected in held_out.text, held_out.text
    assert "2071" not in base.text, base.text

