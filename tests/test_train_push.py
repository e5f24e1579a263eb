"""`lorad train --push`: a short QLoRA run on the embedded base, uploaded to a running server
(real SmolLM2, loopback), then served at once."""

from __future__ import annotations

import pytest

from lorad.base_model import BaseModelConfig
from lorad.clients import Client
from lorad.server.adapter_publish import adapter_digest
from lorad.server.config import EngineConfig, ServerConfig
from lorad.testing import ServerThread
from trainer_helpers import cli_train, write_jsonl, write_yaml

pytestmark = pytest.mark.slow

CONFIG = {
    "base_model": "smollm2-135m-instruct",
    "adapter": "qlora",
    "load_in_4bit": True,
    "sequence_len": 64,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "v_proj"],
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_steps": 2,
    "learning_rate": 0.01,
    "optimizer": "adamw_torch",
    "save_steps": 100,
    "seed": 3,
}


def test_train_push_then_generate(smollm_base, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"messages": [{"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": "Hello!"}]}
        for i in range(4)
    ])
    out = tmp_path / "runs" / "pushed-adapter"
    cfg = write_yaml(tmp_path / "cfg.yaml", dict(CONFIG, datasets=[{"path": str(data), "type": "chat_template"}],
                                                 output_dir=str(out)))
    root = tmp_path / "served"
    root.mkdir()
    engine = EngineConfig(max_seq_len=128, kv_cache_memory="32MiB", max_lora_rank=8, max_loras=2, max_cpu_loras=4)
    server_cfg = ServerConfig(host="127.0.0.1", port=0, metrics_port=None, adapters_dir=str(root),
                              base=BaseModelConfig(), engine=engine)
    with ServerThread(server_cfg, smollm_base) as srv:
        target = f"127.0.0.1:{srv.port}"
        result = cli_train(str(cfg), "--push", target)
        assert f"serving adapter 'pushed-adapter'" in result.output, result.output
        assert adapter_digest(out) in result.output
        assert adapter_digest(root / "pushed-adapter") == adapter_digest(out)
        with Client(target, timeout=120) as client:
            info = client.get_adapter("pushed-adapter")
            assert info.base_match == "yes" and info.trained_for_base == "smollm2-135m-instruct"
            reply = client.generate(messages=[{"role": "user", "content": "Say hello 1"}],
                                    adapter_id="pushed-adapter", max_new_tokens=8)
            assert reply.completion_tokens >= 1
    # the server goes away during training: a clear error, a non-zero exit, the adapter kept on disk
    from lorad.trainer import cli as train_cli

    real_check = train_cli._check_push_target
    train_cli._check_push_target = lambda *args: None
    try:
        refused = cli_train(str(cfg), "--push", "127.0.0.1:1", "--set", "max_steps=1",
                            "--set", f"output_dir={tmp_path / 'second'}", check=False)
    finally:
        train_cli._check_push_target = real_check
    assert refused.exit_code == 1 and "--push 127.0.0.1:1" in refused.output and "UNAVAILABLE" in refused.output
    assert "still in" in refused.output and (tmp_path / "second" / "adapter_model.safetensors").is_file()
