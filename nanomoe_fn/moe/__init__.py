"""The MoE layer's room: its config, parameter records, and the stages route -> dispatch -> experts -> combine.

config.py (MoEConfig, presets), params.py (the parameter records, their creation, sharding and casting),
param_checks.py (check_params), fp8_params.py (FP8 records from and to bf16 ones), route.py, dispatch.py
(dispatch/combine over a comm), experts.py (the expert backends' registry) with expert_kernels.py (the
triton/deepgemm adapters) and expert_kernels_fp8.py (triton_fp8/deepgemm_fp8), layer.py (moe_layer).
Nothing is re-exported here: the public names come from `nanomoe_fn`.
"""
