"""The attention room: DeepSeek-V3 multi-head latent attention (MLA) as pure functions.

config.py (MLAConfig, presets, YaRN scale), rope.py (rotary tables), params.py (the MLAParams record),
cache.py (the compressed KV cache records and their reads and writes), backends.py (the attention
backends' registry: torch, triton), mla.py (`mla`, the block). Nothing is re-exported here: the
public names come from `nanomoe_fn`.
"""
