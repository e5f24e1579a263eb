"""The top-level correctness test: one mixed batch equals each adapter served alone by PEFT.

Real SmolLM2-135M base in NF4, three PEFT adapters created by PEFT itself with
init_lora_weights=False (different ranks and targets), mixed with base-only requests in ONE
engine batch. Every row must produce the same greedy tokens as PEFT with that adapter alone
(batch of one, no padding), and the log-probability the engine reports for every generated
token must match PEFT's teacher-forced log-probability within LOGPROB_TOL.

Why a tolerance and not bit equality: both sides run the same bitsandbytes NF4 kernel for the
base projections, but attention, LoRA and the lm_head accumulate in a different order
(one packed batch vs one sequence), which moves float32 logits by ~1e-4.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.sampling import SamplingParams

pytestmark = pytest.mark.slow

NEW_TOKENS = 20
LOGPROB_TOL = 2e-3
ADAPTERS = {
    # id: (rank, alpha, targets)
    "r8-all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r16-attn": (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "r4-mlp": (4, 8, ["gate_proj", "up_proj", "down_proj"]),
}
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why do cats purr?",
    "Give me a short tip for learning to cook.",
    "What is 12 times 12?",
    "Describe the moon in one sentence.",
    "What do bees make?",
    "Suggest a name for a pet goldfish.",
]
BATCH = [None, "r8-all", "r16-attn", "r4-mlp", "r8-all", None, "r4-mlp", "r16-attn"]


@pytest.fixture(scope="module")
def adapters_dir(smollm_base, tmp_path_factory):
    """Three adapters made and saved by PEFT on the real base, B scaled so text stays fluent."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("oracle-adapters")
    for i, (name, (rank, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        peft_model = get_peft_model(
            smollm_base.model,
            LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False),
        )
        try:
            with torch.no_grad():
                for module in peft_model.modules():
                    if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                        module.lora_B["default"].weight.mul_(0.3)
            peft_model.save_pretrained(root / name)
        finally:
            peft_model.unload()  # leaves the shared base without LoRA layers
    return root


def _prompts(tokenizer):
    ids = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


@pytest.fixture(scope="module")
def engine_rows(smollm_base, adapters_dir):
    """Serve the whole mixed batch at once; return (tokens, logprobs) per row."""
    engine = Engine(smollm_base, EngineConfig(max_seq_len=256, kv_cache_memory="256MiB", max_lora_rank=16),
                    adapters_dir=str(adapters_dir))
    prompts = _prompts(smollm_base.tokenizer)
    results: list = [None] * len(BATCH)
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(event):
            if event.kind != "chunk":
                results[i] = event
                done.release()
        return sink

    with engine:
        # warm the adapters first so all rows join the same batch
        for a in ADAPTERS:
            engine.generate(prompts[0], SamplingParams(max_new_tokens=1), adapter_id=a)
        for i, (ids, adapter) in enumerate(zip(prompts, BATCH)):
            engine.submit(ids, SamplingParams(max_new_tokens=NEW_TOKENS, logprobs=True, ignore_eos=True),
                          sink_for(i), adapter_id=adapter)
        for _ in BATCH:
            assert done.acquire(timeout=600)
        steps = engine.steps
    assert all(r.kind == "final" for r in results), [r.error for r in results if r.kind != "final"]
    return [(r.token_ids, r.logprobs) for r in results], steps


@pytest.fixture(scope="module")
def peft_rows(smollm_base, adapters_dir, engine_rows):
    """PEFT alone: each row greedy-generated in a batch of one, and teacher-forced on the engine's tokens."""
    from peft import PeftModel

    names = list(ADAPTERS)
    model = PeftModel.from_pretrained(smollm_base.model, adapters_dir / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters_dir / name, adapter_name=name)
    model.eval()
    rows, base_rows = [], []
    try:
        for ids, adapter, (engine_tokens, _) in zip(_prompts(smollm_base.tokenizer), BATCH, engine_rows[0]):
            with torch.no_grad(), model.disable_adapter():
                base = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=smollm_base.tokenizer.pad_token_id)
            base_rows.append(base[0, len(ids):].tolist())
            with torch.no_grad():
                if adapter is None:
                    context = model.disable_adapter()
                else:
                    model.set_adapter(adapter)
                    context = torch.no_grad()
                with context:
                    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                         do_sample=False, pad_token_id=smollm_base.tokenizer.pad_token_id)
                    full = torch.tensor([ids + engine_tokens])
                    logits = model(full).logits[0, len(ids) - 1 : -1].float()
            logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(engine_tokens)[:, None])[:, 0]
            rows.append((out[0, len(ids):].tolist(), logprobs.tolist()))
    finally:
        model.unload()
    return rows, base_rows


def test_adapters_change_the_output(peft_rows):
    """Guard against a vacuous pass: on its prompt, every adapter row's text differs from the base's."""
    rows, base_rows = peft_rows
    for i, adapter in enumerate(BATCH):
        if adapter is not None:
            assert rows[i][0] != base_rows[i], f"adapter {adapter} does not change row {i}"


def test_mixed_batch_matches_each_adapter_alone(engine_rows, peft_rows):
    rows, steps = engine_rows
    assert steps < 2 * NEW_TOKENS + 10  # the rows really shared steps (one mixed batch), not one after another
    for i, ((tokens, logprobs), (peft_tokens, peft_logprobs), adapter) in enumerate(zip(rows, peft_rows[0], BATCH)):
        assert tokens == peft_tokens, f"row {i} ({adapter or 'base'}): engine {tokens} vs PEFT alone {peft_tokens}"
        diff = max(abs(a - b) for a, b in zip(logprobs, peft_logprobs))
        assert diff <= LOGPROB_TOL, f"row {i} ({adapter or 'base'}): logprob differs by {diff:.2e}"
