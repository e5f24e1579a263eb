"""Delta math: read, combine, merge and export LoRA adapters. Pure torch; no gRPC, no server code.

    adapter_io   read any PEFT LoRA adapter into per-module deltas; the one adapter writer
    factor       truncated SVD back to LoRA factors, with the relative error it costs
    methods      ties / dare / magnitude_prune operators on dense task vectors
    combine      CombineConfig + combine(): many adapters -> one adapter
    nf4          dequant(NF4(W)): the base a QLoRA / NF4-served adapter was trained and served against
    merge        MergeConfig + merge_adapters(): a verified transformers model folder
    verify       the comparison a merged (or exported) model must pass before it is published
    gguf_export  merged model -> GGUF; adapter -> llama.cpp LoRA GGUF
    ollama       the Modelfile next to an exported GGUF
    export       ExportConfig + export(): hf | gguf | gguf-adapter | ollama, verified, then published

Every long operation takes a progress callback and is a plain function of its inputs, so the CLI
(lorad.deltas_cli) and a server job can both drive it.
"""
