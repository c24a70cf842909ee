"""The whole model: config (ModelConfig, presets), params (ModelParams), forward (prefill and decode over the
MLA caches), generate (sampling, stop tokens, batches of prompts), checkpoint (Hugging Face safetensors),
hf_config (config.json), tokenizer."""
