"""Pytree registration for frozen dataclasses with static (non-tensor) fields: the package's one mechanism.

Every record is registered with `register_dataclass` below (batch.py, moe/params.py,
attention/params.py, attention/cache.py, eplb/recorder.py), never with torch's own helpers, so all of
them flatten the same way.

`torch.utils._pytree.register_dataclass` makes every field a child; records that also carry
static metadata (a layout name, an int) keep it in the tree's context instead, so `tree_map` over
a record only ever sees its tensors. Optional fields (None or a tensor) are children only when set:
torch's pytree makes None a leaf, which `tree_map(lambda t: t.clone(), record)` would trip on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.utils import _pytree as pytree


def register_dataclass(cls: type, static: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> type:
    """Register `cls` as a pytree node: fields in `static` go to the context, the rest are children;
    a field in `optional` is left out of the children when it is None (the context then ends with the
    tuple of child names present)."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [n for n in (*static, *optional) if n not in names]
    if unknown or set(static) & set(optional):
        raise ValueError(f"register_dataclass({cls.__name__}): static and optional must name distinct fields of "
                         f"{names}, got static={static}, optional={optional}")
    children = [n for n in names if n not in static]

    def present(obj: Any) -> list[str]:
        return [n for n in children if n not in optional or getattr(obj, n) is not None]

    def flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        kids, ctx = present(obj), tuple(getattr(obj, n) for n in static)
        return [getattr(obj, n) for n in kids], (ctx + (tuple(kids),) if optional else ctx)

    def unflatten(values: list[Any], context: tuple[Any, ...]) -> Any:
        kids, ctx = (context[-1], context[:-1]) if optional else (children, context)
        absent = {n: None for n in optional if n not in kids}  # left out when None (a field may lack a default)
        return cls(**absent, **dict(zip(kids, values)), **dict(zip(static, ctx)))

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        leaves, ctx = flatten(obj)
        return [(pytree.GetAttrKey(n), v) for n, v in zip(present(obj), leaves)], ctx

    pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls
