"""The MoE layer's room: its config, parameter records, and the stages route -> dispatch -> experts -> combine.

config.py (MoEConfig, presets), params.py (the parameter records, their creation, checks, sharding and
casting), route.py, dispatch.py (dispatch/combine over a comm), experts.py (the expert backends'
registry) with expert_kernels.py (the triton/deepgemm adapters), layer.py (moe_layer, the composition).
Nothing is re-exported here: the public names come from `nanomoe_fn`.
"""
