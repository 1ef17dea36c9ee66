"""What a LLaVA checkpoint and a GGUF file are: formats, layouts, configs, the surgery manifest, the
tokenizer, quant types, the synthetic checkpoint. It knows nothing of runs, tools or steps; it
imports no other package of llava_gguf.
"""
