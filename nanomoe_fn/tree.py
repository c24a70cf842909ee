"""Pytree registration for frozen dataclasses with static (non-tensor) fields.

`torch.utils._pytree.register_dataclass` makes every field a child; records that also carry
static metadata (a layout name, an int) keep it in the tree's context instead, so `tree_map` over
a record only ever sees its tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch.utils import _pytree as pytree


def register_dataclass(cls: type, static: tuple[str, ...] = ()) -> type:
    """Register `cls` as a pytree node: fields in `static` go to the context, the rest are children."""
    names = [f.name for f in dataclasses.fields(cls)]
    children = [n for n in names if n not in static]

    def flatten(obj: Any) -> tuple[list[Any], tuple[Any, ...]]:
        return [getattr(obj, n) for n in children], tuple(getattr(obj, n) for n in static)

    def unflatten(values: list[Any], context: tuple[Any, ...]) -> Any:
        return cls(**dict(zip(children, values)), **dict(zip(static, context)))

    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], tuple[Any, ...]]:
        leaves, ctx = flatten(obj)
        return [(pytree.GetAttrKey(n), v) for n, v in zip(children, leaves)], ctx

    pytree.register_pytree_node(cls, flatten, unflatten, flatten_with_keys_fn=flatten_with_keys,
                                serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
    return cls
