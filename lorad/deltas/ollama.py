"""An Ollama Modelfile next to a model GGUF (`lorad export --format ollama`).

Ollama's TEMPLATE is a Go template, not the Jinja chat template transformers uses, so the two
template families lorad's bases use are recognised and written out (ChatML: SmolLM2, Qwen;
Llama 3) with their stop tokens and the default system prompt the Jinja template inserts. Any
other template is left to Ollama, which reads tokenizer.chat_template from the GGUF.
"""

from __future__ import annotations

from pathlib import Path

_CHATML = (
    '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
    '<|im_start|>assistant\n'
)
_LLAMA3 = (
    '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
    '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
    '<|start_header_id|>assistant<|end_header_id|>\n\n'
)


def modelfile_text(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: FROM the GGUF, the chat template as a Go template (ChatML and Llama 3
    templates are recognised; the Jinja default system prompt becomes SYSTEM), stop tokens."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = ["# Written by lorad export --format ollama: ollama create NAME -f Modelfile", f"FROM ./{gguf_name}"]
    if "<|im_start|>" in template:
        go, stops = _CHATML, ["<|im_start|>", "<|im_end|>"]
    elif "<|start_header_id|>" in template:
        go, stops = _LLAMA3, ["<|start_header_id|>", "<|eot_id|>"]
    else:
        lines.append("# The chat template was not recognised; Ollama reads tokenizer.chat_template from the GGUF.")
        return "\n".join(lines) + "\n"
    lines.append(f'TEMPLATE """{go}"""')
    system = default_system_prompt(tokenizer)
    if system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def default_system_prompt(tokenizer) -> str:
    """The system prompt a chat template inserts when the conversation has none (SmolLM2 has one)."""
    marker = "\x00lorad-user\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    before = text.split(marker)[0]
    empty = tokenizer.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": marker}],
                                          tokenize=False).split(marker)[0]
    if before == empty:
        return ""
    for start, end in (("<|im_start|>system\n", "<|im_end|>"), ("<|start_header_id|>system<|end_header_id|>\n\n",
                                                                  "<|eot_id|>")):
        if start in before:
            return before.split(start, 1)[1].split(end, 1)[0]
    return ""


def write_modelfile(folder: str | Path, gguf_name: str, tokenizer) -> Path:
    path = Path(folder) / "Modelfile"
    path.write_text(modelfile_text(gguf_name, tokenizer))
    return path
