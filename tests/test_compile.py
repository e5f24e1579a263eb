"""torch.compile traces the LoRA ops (custom ops with fake implementations, kernels/custom_ops.py)
and the engine's whole decode step in one graph, with the same results as eager.

backend="aot_eager" traces exactly what inductor would receive (dynamo + AOT autograd with the
fake implementations) without compiling C++, so the test takes seconds.
"""

from __future__ import annotations

import pytest
import torch

from lora_cases import make_problem
from lorad.kernels import add_lora, build_lora_meta, lora_expand, lora_shrink
from lorad.server.config import EngineConfig
from lorad.server.engine import Engine
from lorad.server.sampling import SamplingParams


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_lora_ops_trace_in_one_graph():
    p = make_problem([0, 0, 1, 1, -1, 2], 3, 32, 24, 4, torch.float32, seed=3)
    meta = build_lora_meta(p.slots, 3)

    def step(y, x):
        wide = torch.cat([y, y], dim=1) * 2  # LoRA into a column slice of a fused output
        add_lora(wide[:, 24:], x, p.lora_a, p.lora_b, p.scale, meta)
        v = lora_shrink(x, p.lora_a, meta)
        lora_expand(wide[:, :24], v, p.lora_b, p.scale, meta)
        return wide + 1

    eager = step(p.y0.clone(), p.x)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(p.y0.clone(), p.x)
    assert torch.equal(compiled, eager)
    assert not torch.equal(eager[:, 24:], eager[:, :24] * 0 + (p.y0 * 2 + 1))  # the LoRA did change it


@pytest.mark.parametrize("kind", ["lora", "modules_to_save"])
def test_decode_step_traces_in_one_graph(tiny_base, tiny_geometry, tmp_path, kind):
    from lorad.testing import write_random_adapter

    if kind == "lora":
        write_random_adapter(tmp_path / "a0", tiny_geometry, rank=4, seed=1, b_std=0.2)
    else:  # trained lm_head and embed_tokens copies: their rows come from host-side indices, no sync
        from test_saved_module_serving import _peft_adapter

        _peft_adapter(tiny_base.model, tmp_path / "a0", ["lm_head", "embed_tokens"], seed=5)
    engine = Engine(tiny_base, EngineConfig(max_seq_len=64, max_batch_size=3, max_lora_rank=8, threads=1),
                    adapters_dir=str(tmp_path))
    captured = []
    forward = engine.runner.forward
    engine.runner.forward = lambda batch: (captured.append(batch), forward(batch))[1]
    prompt = engine.encode(prompt="The capital of France is")
    with engine:
        # a0 resident first: adapters load on the loader thread, and a base row submitted beside a
        # cold a0 could finish before a0's first decode step (then no step is mixed)
        engine.generate(prompt, SamplingParams(max_new_tokens=1), adapter_id="a0")
        for adapter in ("a0", None):  # a mixed decode step: one adapter row, one base row
            engine.submit(prompt, SamplingParams(max_new_tokens=8), lambda e: None, adapter_id=adapter)
        engine.generate(prompt, SamplingParams(max_new_tokens=8), adapter_id="a0")
    batch = next(b for b in reversed(captured) if all(c.length == 1 for c in b.chunks)  # decode only,
                 and 0 < b.lora_meta.num_lora_tokens < len(b.chunks))  # adapter and base rows mixed
    eager = forward(batch)  # rewrites the same cache positions with the same values
    batch = normal_tensors(batch)  # the engine's step made inference tensors, which AOT cannot trace
    with torch.no_grad():
        compiled = torch.compile(engine.runner.step, backend="aot_eager", fullgraph=True)(batch)
    assert torch.allclose(compiled, eager, rtol=0, atol=1e-5)


def normal_tensors(obj):
    """A copy of a (nested) dataclass with every tensor cloned outside inference mode."""
    import dataclasses

    changes = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.clone()
        elif dataclasses.is_dataclass(value):
            changes[f.name] = normal_tensors(value)
    return dataclasses.replace(obj, **changes)
