"""What each axis of a tensor holds, derived from the operations that made it.

Like ``torch.fx.passes.shape_prop`` propagates shapes, this module propagates *axis labels* along a
graph: one ``Axis`` letter per axis, ``N`` the batch, ``C`` the channels (features), ``S`` a spatial
or token axis, ``M`` the batch merged with spatial axes (Swin's windows, LeViT's ``flatten(0, 1)``),
``?`` unknown. Which rule an op follows is its entry in the op registry (``ops.py``). The labels
of an op's output follow from the op and its inputs' labels, never from the sizes happening to
coincide, so a tensor's layout does not change with the input size:

- conv, pooling, batch/group/instance norm, interpolate, upsample, pixel shuffle and fold make
  channels-first outputs (``NCHW`` for rank 4); the model's input is channels-first;
- ``linear`` labels the last axis ``C`` (so a linear on a rank-3 input is ``NLC``), except that a
  linear over a spatial axis (MLP-Mixer's token mixing) keeps it spatial; an embedding appends ``C``;
- a LayerNorm or RMSNorm over the last dim implies that dim is the channels, unless the input's
  labels already say otherwise;
- ``permute``, ``transpose``, ``movedim``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``,
  indexing and ``view``/``reshape`` move the labels with the axes they move; merging axes of
  different kinds (the channels with the batch or with a spatial axis) gives ``?``, merging
  spatial axes gives ``S`` (so ``flatten(2)`` then ``transpose(1, 2)`` turns ``NCHW`` into ``NLC``),
  splitting an axis gives its parts its label (channel shuffle keeps its channels), and an ``M``
  axis split with the traced batch size in front is the batch and spatial axes again;
- ``cat``, ``chunk``, ``split`` and elementwise ops keep their inputs' labels; where known inputs
  disagree on an axis it becomes ``?``; reductions drop the reduced axes;
- a product of two activations (``q @ k^T``) has no channel axis: all ``?``.

``layout_of`` turns labels into a ``Layout`` (``NCHW``, ``NLC``, ...) or ``None`` when the labels
are not one of them. The same rules run on fx graphs (``graph.py``), on export's ATen graphs and,
per torch function call, in the hooks backend.

Example:
    >>> layout_of(propagate("transpose", ("NCS", 1, 2), {}, AxisEnv.simple()), (2, 16, 8))
    <Layout.NLC: 'NLC'>
    >>> propagate("flatten", ("NCSS", 2), {}, AxisEnv.simple({"NCSS": (2, 8, 4, 4)}))
    'NCS'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Union

from torch import nn

from .layout import Layout
from .ops import MODULE_RULE_NAMES, OPS, RULE_NAMES, ModuleClass, module_class, op_name
from .sizes import TRACE_BATCH

__all__ = ["Axis", "Axes", "Labels", "AxisEnv", "AxisRuleError", "propagate", "module_axes", "layout_of", "input_axes", "op_name"]

class Axis(StrEnum):
    """What one axis of a tensor holds: one character of an ``Axes`` string."""

    BATCH = "N"
    CHANNELS = "C"
    SPATIAL = "S"  # a spatial axis or the token axis
    MERGED = "M"  # the batch merged with spatial axes (Swin's windows, LeViT's ``flatten(0, 1)``)
    UNKNOWN = "?"


Axes = str
"""One ``Axis`` per axis, as a string (``NCHW`` maps are ``"NCSS"``): they slice, join and compare as text."""

_HEADS = frozenset({Axis.BATCH, Axis.MERGED, Axis.UNKNOWN})
"""What a leading axis may stay through an op that rewrites the others: a batch, folded or not, or unknown."""

Labels = Union[Axes, None, tuple["Labels", ...]]
"""The labels of an op's output: ``Axes`` for a tensor, ``None`` for unknown, a tuple for a tuple of outputs."""

Shape = tuple[int, ...]


class AxisRuleError(Exception):
    """An axis rule failed on its op's arguments: a bug in this module, never the user's input.

    Not a ``RuntimeError`` or ``TypeError``, so no handler of an op's own failure (one that does
    not run on meta) takes it for one and turns it into an unknown layout.
    """


@dataclass(frozen=True)
class AxisEnv:
    """How a rule reads its arguments: ``labels(v)`` and ``shape(v)`` of an argument, the output's shape."""

    labels: Callable[[Any], Labels]
    shape: Callable[[Any], Shape | None]
    out: Any  # Shape, or a tuple of shapes for a tuple output, or None
    batch: int = TRACE_BATCH

    @staticmethod
    def simple(shapes: Mapping[str, Shape] | None = None, out: Any = None) -> AxisEnv:
        """An env over plain label strings (for examples and tests): a string argument is its own labels."""
        table = dict(shapes or {})
        return AxisEnv(lambda v: v if isinstance(v, str) else None, lambda v: table.get(v) if isinstance(v, str) else None, out)

    def with_shape(self, shape: Callable[[Any], Shape | None]) -> AxisEnv:
        return AxisEnv(self.labels, shape, self.out, self.batch)


def input_axes(rank: int) -> Axes | None:
    """The model input's labels: channels-first (``NC``, ``NCS``, ``NCSS``, ``NCSSS``)."""
    return Axis.BATCH + Axis.CHANNELS + Axis.SPATIAL * (rank - 2) if rank >= 2 else (Axis.BATCH if rank == 1 else None)


def layout_of(labels: Labels, shape: Shape | None) -> Layout | None:
    """The ``Layout`` that ``labels`` spell, or ``None`` when they spell none (unknown, batch folded, no channel axis).

    Example:
        >>> layout_of("NSSC", (2, 4, 4, 8)), layout_of("N?", (2, 64)), layout_of("NCSC", (2, 3, 4, 5))
        (<Layout.NHWC: 'NHWC'>, None, None)
    """
    if not isinstance(labels, str) or shape is None or len(labels) != len(shape) or not 2 <= len(labels) <= 5:
        return None
    if labels[0] != Axis.BATCH or labels.count(Axis.CHANNELS) != 1:
        return None
    rest = labels.replace(Axis.BATCH, "", 1).replace(Axis.CHANNELS, "", 1)
    if rest and set(rest) != {Axis.SPATIAL}:
        return None
    if labels[1] == Axis.CHANNELS:
        return Layout.channels_first(len(labels))
    if labels[-1] == Axis.CHANNELS:
        return Layout.channels_last(len(labels))
    return None


# ----------------------------------------------------------------------------- helpers


def _dim(d: Any, rank: int) -> int | None:
    if isinstance(d, bool) or not isinstance(d, int):
        return None
    d = d + rank if d < 0 else d
    return d if 0 <= d < rank else None


def _merge(labels: Sequence[str]) -> str:
    """One label for axes merged into one (or agreeing inputs): the common label, else ``?``."""
    kinds = set(labels)
    return kinds.pop() if len(kinds) == 1 else Axis.UNKNOWN


def _first_tensor(args: Sequence[Any], env: AxisEnv) -> tuple[Axes | None, Shape | None]:
    for a in args:
        lab = env.labels(a)
        if isinstance(lab, str):
            return lab, env.shape(a)
    return None, None


def _out_shape(env: AxisEnv) -> Shape | None:
    out = env.out
    if isinstance(out, tuple) and out and all(isinstance(s, int) for s in out):
        return out
    if isinstance(out, tuple) and out == ():
        return ()
    return None


def _unknown(env: AxisEnv) -> Labels:
    return None


def _channels_first(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    out = env.out
    if isinstance(out, tuple) and out and not all(isinstance(s, int) for s in out):
        # A tuple output (max_pool2d_with_indices, native_batch_norm): its tensors of the first one's rank.
        first = next((s for s in out if isinstance(s, tuple) and len(s) >= 2), None)
        return tuple(input_axes(len(s)) if isinstance(s, tuple) and first and len(s) == len(first) else None for s in out)
    shape = _out_shape(env)
    if shape is None or len(shape) < 2:
        return None
    lab, _ = _first_tensor(args[:1], env)
    head = lab[0] if lab is not None and lab[0] in _HEADS else Axis.BATCH if lab is None else Axis.UNKNOWN
    return head + Axis.CHANNELS + Axis.SPATIAL * (len(shape) - 2)  # the batch axis stays what it was (a folded batch stays folded)


def _feature_last(labels: Axes | None, rank: int, keep_spatial: bool) -> Axes:
    """Labels after an op that writes features along the last axis (linear, embedding, layer norm)."""
    lab = labels if labels is not None and len(labels) == rank else Axis.UNKNOWN * rank
    if keep_spatial and lab[-1] == Axis.SPATIAL and Axis.CHANNELS in lab[:-1]:
        return lab  # a linear over a spatial axis (token mixing) keeps the channels where they are
    head = lab[0] if lab[0] in _HEADS else Axis.UNKNOWN
    middle = Axis.SPATIAL * (rank - 2)
    return (head + middle + Axis.CHANNELS) if rank >= 2 else Axis.CHANNELS


def _linear(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    shape = _out_shape(env)
    if shape is None or len(shape) < 2:
        return None
    lab, _ = _first_tensor(args, env)
    if lab is None:
        return _feature_last(None, len(shape), keep_spatial=False)
    return _feature_last(lab, len(shape), keep_spatial=True)


def _addmm(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    # aten.addmm(bias, x, w_t): the data input is the second argument.
    return _linear(args[1:2], kwargs, env)


def _layer_norm(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, shape = _first_tensor(args[:1], env)
    normalized = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    out = env.out
    multi = isinstance(out, tuple) and out and not all(isinstance(s, int) for s in out)
    main_shape = out[0] if multi else out
    if not isinstance(main_shape, tuple):
        return None
    if isinstance(normalized, int):
        normalized = (normalized,)
    result: Labels
    if isinstance(normalized, (list, tuple)) and len(normalized) == 1 and len(main_shape) >= 2:
        if lab is not None and len(lab) == len(main_shape) and (lab[-1] == Axis.CHANNELS or (Axis.CHANNELS in lab and Axis.UNKNOWN not in lab)):
            result = lab  # the labels already say where the channels are: the norm moves nothing
        else:
            result = _feature_last(lab, len(main_shape), keep_spatial=False)
    else:
        result = lab if lab is not None and len(lab) == len(main_shape) else None
    return (result, *(None for _ in out[1:])) if multi else result


def _embedding(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    shape = _out_shape(env)
    lab, _ = _first_tensor(args, env)
    if shape is None or lab is None or len(lab) + 1 != len(shape):
        return None
    return (lab[0] if lab[0] in _HEADS else Axis.UNKNOWN) + Axis.SPATIAL * (len(lab) - 1) + Axis.CHANNELS


def _elementwise(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    shape = _out_shape(env)
    if shape is None:
        return _same_as_first(args, kwargs, env)
    return _broadcast([*args, *kwargs.values()], shape, env)


def _broadcast(values: Sequence[Any], shape: Shape, env: AxisEnv) -> Labels:
    """Per axis, the label the full-rank inputs agree on (unknown inputs do not vote); ``?`` where they disagree."""
    votes: list[set[str]] = [set() for _ in shape]
    for value in _flat(values):
        lab = env.labels(value)
        s = env.shape(value)
        if not isinstance(lab, str) or s is None or len(lab) != len(shape) or len(s) != len(shape):
            continue
        for i, (a, n) in enumerate(zip(lab, s)):
            if a != Axis.UNKNOWN and (n == shape[i] or shape[i] == 1):
                votes[i].add(a)
    if not any(votes):
        return None
    return "".join(v.pop() if len(v) == 1 else Axis.UNKNOWN for v in votes)


def _flat(values: Sequence[Any]) -> list[Any]:
    found: list[Any] = []
    for v in values:
        if isinstance(v, (list, tuple)) and not isinstance(v, str):
            found.extend(_flat(v))
        else:
            found.append(v)
    return found


def _same_as_first(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args, env)
    return lab


def _cat(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    tensors = args[0] if args else kwargs.get("tensors", ())
    shape = _out_shape(env)
    if shape is None or not isinstance(tensors, (list, tuple)):
        return None
    # Per axis, as for elementwise ops: the inputs' known labels vote, unknown axes do not.
    return _broadcast(list(tensors), shape, env.with_shape(lambda v: shape))


def _stack(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    tensors = args[0] if args else kwargs.get("tensors", ())
    shape = _out_shape(env)
    if shape is None or not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(shape))
    if d is None:
        return None
    # The inputs vote as for cat; the new axis means nothing an adapter can read (``?``), so the stack is no feature,
    # but a reduction over that axis (FPN's ``torch.stack(levels).sum(0)``) gets the inputs' labels back.
    inner = shape[:d] + shape[d + 1 :]
    lab = _broadcast(list(tensors), inner, env)
    return None if lab is None else lab[:d] + Axis.UNKNOWN + lab[d:]


def _split(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    out = env.out
    if not isinstance(out, (tuple, list)):
        return None
    return tuple(lab if isinstance(s, tuple) and lab is not None and len(s) == len(lab) else None for s in out)


def _unbind(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    out = env.out
    if lab is None or not isinstance(out, (tuple, list)):
        return None
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(lab))
    if d is None:
        return None
    rest = lab[:d] + lab[d + 1 :]
    return tuple(rest for _ in out)


def _permute(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    if lab is None:
        return None
    dims = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kwargs.get("dims"))
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (list, tuple)) or len(dims) != len(lab):
        return None
    idx = [_dim(d, len(lab)) for d in dims]
    if None in idx or len(set(idx)) != len(lab):
        return None
    return "".join(lab[i] for i in idx)  # type: ignore[index]


def _transpose(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    if lab is None:
        return None
    if len(args) < 3:
        if len(lab) == 2:  # t()
            return lab[::-1]
        d0, d1 = kwargs.get("dim0"), kwargs.get("dim1")
    else:
        d0, d1 = args[1], args[2]
    a, b = _dim(d0, len(lab)), _dim(d1, len(lab))
    if a is None or b is None:
        return None
    out = list(lab)
    out[a], out[b] = out[b], out[a]
    return "".join(out)


def _t(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    return lab[::-1] if lab is not None and len(lab) <= 2 else None


def _movedim(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    if lab is None or len(args) < 3:
        return None
    src, dst = args[1], args[2]
    src = (src,) if isinstance(src, int) else tuple(src)
    dst = (dst,) if isinstance(dst, int) else tuple(dst)
    rank = len(lab)
    s = [_dim(d, rank) for d in src]
    t = [_dim(d, rank) for d in dst]
    if None in s or None in t or len(s) != len(t):
        return None
    order = [i for i in range(rank) if i not in s]
    result: list[int | None] = [None] * rank
    for a, b in zip(s, t):
        result[b] = a  # type: ignore[index]
    rest = iter(order)
    filled = [r if r is not None else next(rest) for r in result]
    return "".join(lab[i] for i in filled)


def _group(labels: str, sizes: Sequence[int]) -> str:
    """The label of axes merged into one: size-1 axes do not vote; the batch merged with spatial axes is ``M``."""
    voting = [a for a, n in zip(labels, sizes) if n != 1] or list(labels)
    if len(voting) > 1 and (Axis.BATCH in voting or Axis.MERGED in voting):
        batch = voting[0] in (Axis.BATCH, Axis.MERGED) and set(voting[1:]) <= {Axis.SPATIAL}
        return Axis.MERGED if batch else Axis.UNKNOWN
    return _merge(voting)


def _flatten(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    value = args[0] if args else kwargs.get("input")
    lab, shape = env.labels(value), env.shape(value)
    if not isinstance(lab, str) or shape is None:
        return None
    start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
    end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
    return _flatten_labels(lab, shape, start, end)


def _flatten_labels(lab: str, shape: Shape, start: Any, end: Any) -> Labels:
    rank = len(lab)
    if rank == 0:
        return None
    a, b = _dim(start, rank), _dim(end, rank)
    if a is None or b is None or a > b:
        return None
    return lab[:a] + _group(lab[a : b + 1], shape[a : b + 1]) + lab[b + 1 :]


def _unflatten(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    value = args[0] if args else None
    lab, shape = env.labels(value), env.shape(value)
    out = _out_shape(env)
    if not isinstance(lab, str) or shape is None or out is None:
        return None
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim"), len(lab))
    if d is None:
        return None
    parts = len(out) - len(lab) + 1
    return lab[:d] + _split_label(lab[d], out[d : d + parts], env.batch) + lab[d + 1 :]


def _split_label(label: str, sizes: Sequence[int], batch: int = TRACE_BATCH) -> str:
    """Labels of the axes one axis is split into: each part keeps the label; size-1 parts beside others are spatial.

    A batch merged with spatial axes (``M``) split with the batch size in front is ``N`` then spatial axes.
    """
    big = [n for n in sizes if n != 1]
    if label == Axis.MERGED:
        if sizes and sizes[0] == batch and len(sizes) > 1:
            return Axis.BATCH + Axis.SPATIAL * (len(sizes) - 1)
        return Axis.MERGED if len(big) <= 1 and len(sizes) == 1 else Axis.UNKNOWN * len(sizes)
    if label == Axis.BATCH and len(big) > 1:
        return Axis.UNKNOWN * len(sizes)
    if not big:
        return label + Axis.SPATIAL * (len(sizes) - 1)
    return "".join(Axis.SPATIAL if n == 1 else label for n in sizes)


def _view(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, shape = _first_tensor(args[:1], env)
    out = _out_shape(env)
    if lab is None or shape is None or out is None:
        return None
    return reshape_labels(lab, shape, out, env.batch)


def reshape_labels(lab: str, shape: Shape, out: Shape, batch: int = TRACE_BATCH) -> Labels:
    """Labels after a view/reshape from ``shape`` to ``out``, by grouping axes whose sizes multiply alike.

    Example:
        >>> reshape_labels("NSC", (2, 16, 8), (2, 4, 4, 8)), reshape_labels("NSC", (2, 16, 8), (2, 16, 2, 4))
        ('NSSC', 'NSCC')
    """
    if len(lab) != len(shape) or 0 in shape or 0 in out or math.prod(shape) != math.prod(out):
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    na, nb = len(shape), len(out)
    while i < na and j < nb:
        gi, gj = [i], [j]
        pa, pb = shape[i], out[j]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i >= na:
                    return None
                pa *= shape[i]
                gi.append(i)
                i += 1
            else:
                if j >= nb:
                    return None
                pb *= out[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    if not groups:
        return None
    # Trailing size-1 axes join the last group.
    groups[-1][0].extend(range(i, na))
    groups[-1][1].extend(range(j, nb))
    result = [""] * nb
    for gi, gj in groups:
        label = _group("".join(lab[k] for k in gi), [shape[k] for k in gi])
        parts = _split_label(label, [out[k] for k in gj], batch) if len(gj) > 1 else label
        for k, p in zip(gj, parts):
            result[k] = p
    return "".join(result)


def _squeeze(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, shape = _first_tensor(args[:1], env)
    if lab is None or shape is None:
        return None
    dims = args[1:] if len(args) > 1 else ((kwargs["dim"],) if "dim" in kwargs else None)
    if dims is not None and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    rank = len(lab)
    if dims is None:
        drop = {k for k, n in enumerate(shape) if n == 1}
    else:
        idx = [_dim(d, rank) for d in dims]
        if None in idx:
            return None
        drop = {k for k in idx if shape[k] == 1}  # type: ignore[index]
    return "".join(a for k, a in enumerate(lab) if k not in drop)


def _unsqueeze(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    if lab is None:
        return None
    d = _dim(args[1] if len(args) > 1 else kwargs.get("dim"), len(lab) + 1)
    if d is None:
        return None
    return lab[:d] + Axis.SPATIAL + lab[d:]


def _getitem(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    if len(args) < 2:
        return None
    lab = env.labels(args[0])
    index = args[1]
    if isinstance(lab, tuple):
        return lab[index] if isinstance(index, int) and -len(lab) <= index < len(lab) else None
    if not isinstance(lab, str):
        return None
    items = index if isinstance(index, tuple) else (index,)
    if sum(1 for it in items if it is Ellipsis) > 1:
        return None
    # One constant list of positions (``x[:, :, [0, 1, 8, ...]]``, a gather along one axis) keeps that axis where it
    # is; with an integer or another list beside it, advanced indexing may move axes to the front.
    picks = [it for it in items if _positions(it)]
    if len(picks) > 1 or picks and any(isinstance(it, int) and not isinstance(it, bool) for it in items):
        return None
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    out: list[str] = []
    pos = 0
    for it in items:
        if it is Ellipsis:
            take = len(lab) - consumed
            out.extend(lab[pos : pos + take])
            pos += take
        elif it is None:
            out.append(Axis.SPATIAL)
        elif isinstance(it, slice) or _positions(it):
            if pos >= len(lab):
                return None
            out.append(lab[pos])
            pos += 1
        elif isinstance(it, int) and not isinstance(it, bool):
            pos += 1  # an integer index drops the axis
        else:
            return None  # advanced indexing, or an index only known at run time
    out.extend(lab[pos:])
    shape = _out_shape(env)
    result = "".join(out)
    return result if shape is None or len(shape) == len(result) else None


def _im2col(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    """``nn.Unfold`` / ``im2col``: (N, C, *S) -> (N, C * prod(kernel), L), every patch's values a feature of its
    position (TNT's pixel embedding, timm's sliding-window ops)."""
    lab, _ = _first_tensor(args[:1], env)
    shape = _out_shape(env)
    if lab is None or shape is None or len(shape) != 3:
        return None
    return lab[0] + Axis.CHANNELS + Axis.SPATIAL


def _col2im(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    """``F.fold`` / ``nn.Fold`` / ``col2im``: (N, C * prod(kernel), L) -> (N, C, *S), channels-first maps again.

    Its input is often unlabelled (MobileViT reshapes ``F.unfold``'s patches to (N, C, pixels, patches), which
    merges and splits axes no rule follows), so its leading axis is the batch when it is one already or, unknown,
    when it has the traced batch size (as an ``M`` axis split with the batch size in front is the batch again).
    """
    lab, shape = _first_tensor(args[:1], env)
    out = _out_shape(env)
    if out is None or len(out) < 3:
        return None
    head = lab[0] if lab is not None and lab[0] in (Axis.BATCH, Axis.MERGED) else (
        Axis.BATCH if shape is not None and shape[0] == env.batch == out[0] else Axis.UNKNOWN)
    return head + Axis.CHANNELS + Axis.SPATIAL * (len(out) - 2)


def _positions(index: Any) -> bool:
    """Whether ``index`` is a constant flat list of integer positions."""
    return isinstance(index, list) and bool(index) and all(isinstance(i, int) and not isinstance(i, bool) for i in index)


def _slice(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    return _same_as_first(args[:1], kwargs, env)  # aten.slice(x, dim, start, end): same axes


def _select(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    if lab is None or len(args) < 2:
        return None
    d = _dim(args[1], len(lab))
    return None if d is None else lab[:d] + lab[d + 1 :]


def _reduce(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    if lab is None:
        return None
    if len(args) > 1 and env.labels(args[1]) is not None:
        return _elementwise(args, kwargs, env)  # torch.max(a, b): elementwise
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 and isinstance(args[2], bool) else kwargs.get("keepdim", False)
    out = env.out
    if dim is None:
        return None  # a full reduction: no axes left to label
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (list, tuple)) else None
    if dims is None:
        return None
    idx = {_dim(d, len(lab)) for d in dims}
    if None in idx:
        return None
    result = lab if keepdim else "".join(a for k, a in enumerate(lab) if k not in idx)
    if isinstance(out, tuple) and out and not all(isinstance(s, int) for s in out):
        return tuple(result for _ in out)  # values and indices
    return result


def _matmul(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    data = [a for a in args if env.labels(a) is not None]
    if len(data) == 1:
        return _linear(tuple(data), kwargs, env)  # x @ W with W a parameter
    shape = _out_shape(env)
    if not shape:
        return None
    # A product of two activations: the leading (batch) axes broadcast; the last two are neither channels nor space.
    votes = []
    for k in range(len(shape) - 2):
        seen = set()
        for a in data:
            lab = env.labels(a)
            if isinstance(lab, str) and len(lab) == len(shape) and lab[k] != Axis.UNKNOWN:
                seen.add(lab[k])
        votes.append(seen.pop() if len(seen) == 1 else Axis.UNKNOWN)
    return "".join(votes) + Axis.UNKNOWN * 2


def _sdpa(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    q = env.labels(args[0]) if args else None
    v = env.labels(args[2]) if len(args) > 2 else None
    out = env.out
    multi = isinstance(out, tuple) and out and not all(isinstance(s, int) for s in out)
    main = out[0] if multi else out
    if not isinstance(q, str) or not isinstance(v, str) or not isinstance(main, tuple) or len(q) != len(main):
        result = None
    else:
        result = q[:-1] + v[-1]
    return (result, *(None for _ in out[1:])) if multi else result


def _mha(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    q = env.labels(args[0]) if args else None
    out = env.out
    if isinstance(out, tuple) and out and not all(isinstance(s, int) for s in out):
        return (q if isinstance(q, str) else None, *(None for _ in out[1:]))
    return q if isinstance(q, str) else None


def _expand(args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    lab, _ = _first_tensor(args[:1], env)
    shape = _out_shape(env)
    if lab is None or shape is None:
        return None
    return Axis.UNKNOWN * (len(shape) - len(lab)) + lab if len(shape) >= len(lab) else None


_RULE_FUNCTIONS: dict[str, Callable[[tuple, dict, AxisEnv], Labels]] = {
    "elementwise": _elementwise, "channels_first": _channels_first, "linear": _linear, "addmm": _addmm,
    "layer_norm": _layer_norm, "embedding": _embedding, "cat": _cat, "stack": _stack, "split": _split,
    "unbind": _unbind, "permute": _permute, "transpose": _transpose, "t": _t, "movedim": _movedim,
    "flatten": _flatten, "unflatten": _unflatten, "view": _view, "squeeze": _squeeze, "unsqueeze": _unsqueeze,
    "getitem": _getitem, "slice": _slice, "select": _select, "reduce": _reduce, "matmul": _matmul, "sdpa": _sdpa,
    "mha": _mha, "expand": _expand, "im2col": _im2col, "col2im": _col2im,
}
if set(_RULE_FUNCTIONS) != RULE_NAMES:  # a rule the registry may name must have a function, and no function idles
    raise ImportError(f"axes.py binds rules {sorted(set(_RULE_FUNCTIONS) ^ RULE_NAMES)} that ops.RULE_NAMES does not "
                      "list, or the reverse. Hint: name each rule once in both.")
# The rule of every registered op that has one, by ``op_name``: the registry (``ops.OPS``) decides which ops a rule
# covers; this index only binds names to functions.
_RULES: dict[str, Callable[[tuple, dict, AxisEnv], Labels]] = {
    op.name: _RULE_FUNCTIONS[op.rule] for op in OPS.values() if op.rule
}


def propagate(op: str, args: tuple, kwargs: Mapping[str, Any], env: AxisEnv, *, node: str | None = None) -> Labels:
    """The labels of the output of op ``op`` called with ``args``/``kwargs``.

    Args:
        op: the op's plain name (``op_name``): ``conv2d``, ``permute``, ``add``, an ATen op name.
        args, kwargs: the call's arguments; ``env.labels``/``env.shape`` read the tensors among them.
        env: how to read an argument's labels and shape, and the output's shape.
        node: the graph node the op is, named in an ``AxisRuleError``.

    Returns:
        The output's labels; an op no rule knows keeps the labels of a same-shaped input (an
        elementwise op) unless it is known to move axes, else ``None``.

    Raises:
        AxisRuleError: the op's rule failed; the message names the op and the node.
    """
    rule = _RULES.get(op)
    if rule is not None:
        try:
            return rule(tuple(args), dict(kwargs), env)
        except Exception as exc:  # a rule that cannot read its arguments is a bug, not an unknown layout
            where = f" at node {node!r}" if node else ""
            raise AxisRuleError(
                f"the axis rule of op {op!r} failed{where}: {type(exc).__name__}: {exc}\n"
                "Hint: this is a bug in autoprobe's axes.py; report it with the model. Until then, keep the "
                "module that calls this op whole with leaf_paths=[...] (`--leaf PATH`)."
            ) from exc
    entry = OPS.get(op)
    if entry is not None and entry.moves_axes:
        return None
    shape = _out_shape(env)
    if shape is None:
        return None
    # An op no rule names: when an input has the output's shape, the op maps each element in place.
    same = [a for a in _flat([*args, *kwargs.values()]) if env.shape(a) == shape and isinstance(env.labels(a), str)]
    return _broadcast(same, shape, env) if same else None


# ---- module calls: a registered class's rule (``ops.ModuleClass.rule``) reads the module's attributes as its op's
# arguments; the registry decides which classes a rule covers, this table only binds names to functions.


def _as_called(rule: Callable[[tuple, dict, AxisEnv], Labels]) -> Callable[[nn.Module, tuple, dict, AxisEnv], Labels]:
    """A module rule for a module whose call passes its functional op's arguments (a conv, a linear, a dropout)."""

    def call(module: nn.Module, args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
        return rule(args, kwargs, env)

    return call


def _module_layer_norm(module: nn.Module, args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    return _layer_norm((args[0], tuple(module.normalized_shape)), {}, env) if args else None


def _module_flatten(module: nn.Module, args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    return _flatten((args[0], module.start_dim, module.end_dim), {}, env) if args else None


def _module_unflatten(module: nn.Module, args: tuple, kwargs: dict, env: AxisEnv) -> Labels:
    return _unflatten((args[0], module.dim), {}, env) if args else None


_MODULE_RULES: dict[str, Callable[[nn.Module, tuple, dict, AxisEnv], Labels]] = {
    "elementwise": _as_called(_elementwise), "same_as_first": _as_called(_same_as_first),
    "channels_first": _as_called(_channels_first), "linear": _as_called(_linear), "embedding": _as_called(_embedding),
    "mha": _as_called(_mha), "im2col": _as_called(_im2col), "col2im": _as_called(_col2im),
    "layer_norm": _module_layer_norm, "flatten": _module_flatten, "unflatten": _module_unflatten,
}
if set(_MODULE_RULES) != MODULE_RULE_NAMES:  # a rule a module class may name must have a function, and none idles
    raise ImportError(f"axes.py binds module rules {sorted(set(_MODULE_RULES) ^ MODULE_RULE_NAMES)} that "
                      "ops.MODULE_RULE_NAMES does not list, or the reverse. Hint: name each rule once in both.")


def module_axes(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], env: AxisEnv) -> Labels:
    """The labels of a module call's output, from the module's registry entry (``ops.module_class``).

    A registered class follows its entry's rule (``Conv2d`` -> ``channels_first``, ``LayerNorm`` ->
    ``layer_norm`` over its ``normalized_shape``, ``Flatten`` -> ``flatten``; activations, dropout and
    identities are elementwise); a subclass follows its nearest registered base's. A module autoprobe keeps
    whole with no rule (a leaf block) keeps a same-shaped input's labels, makes channels-first maps when its
    last layer is a convolution or pooling, and is otherwise unknown.

    Args:
        module: the called module.
        args, kwargs: the call's arguments; ``env.labels``/``env.shape`` read the tensors among them.
        env: how to read an argument's labels and shape, and the output's shape.

    Returns:
        The output's labels, or ``None`` where they are unknown.

    Example:
        >>> env = AxisEnv.simple({"NCSS": (2, 8, 4, 4)}, out=(2, 128))
        >>> module_axes(nn.Flatten(), ("NCSS",), {}, env)
        'N?'
        >>> module_axes(nn.Conv2d(8, 8, 1), ("NCSS",), {}, AxisEnv.simple(out=(2, 8, 4, 4)))
        'NCSS'
    """
    entry = module_class(module)
    if entry is not None and entry.rule:
        return _MODULE_RULES[entry.rule](module, tuple(args), dict(kwargs), env)
    shape = _out_shape(env)
    if shape is not None:
        same = [a for a in args if env.shape(a) == shape and isinstance(env.labels(a), str)]
        if same:
            return _broadcast(same, shape, env)
        last = _last_layer(module)
        if last is not None and len(shape) >= 2:
            return input_axes(len(shape))
    return None


def _makes_map(entry: ModuleClass | None) -> bool:
    return entry is not None and entry.kind in ("conv", "pool") and entry.rule == "channels_first"


def _last_layer(module: nn.Module) -> nn.Module | None:
    """The block's last conv or pooling layer that makes channels-first maps, when no linear comes after it (its
    output is a map); read off each layer's registry entry."""
    layers = [m for m in module.modules() if (e := module_class(m)) is not None and (_makes_map(e) or e.rule == "linear")]
    if layers and _makes_map(module_class(layers[-1])):
        return layers[-1]
    return None


def run_labels(fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], labels: Mapping[int, Axes],
               batch: int = TRACE_BATCH) -> Labels:
    """The labels of ``fn(*args, **kwargs)``, by running it and propagating labels one torch function at a time.

    For a Python function fx keeps whole (timm's autowrapped ``deblockify``, ``window_partition``): no rule names
    it, but the torch functions inside it each have one. ``args`` hold meta tensors (shapes only, nothing is
    computed); ``labels`` maps ``id(tensor)`` to the labels of each input tensor.

    Example:
        >>> import torch
        >>> x = torch.empty(2, 4, 6, 8, device="meta")
        >>> run_labels(lambda t: t.flatten(2).transpose(1, 2), (x,), {}, {id(x): "NCSS"})
        'NSC'
    """
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils.weak import WeakIdKeyDictionary

    known: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def labels_of(value: Any) -> Labels:
        if isinstance(value, torch.Tensor):
            return known.get(value)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(known.get(v) for v in value)
        return None

    def shape_of(value: Any) -> Shape | None:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def shapes(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        return tuple(shapes(v) for v in value) if isinstance(value, (tuple, list)) else None

    def store(value: Any, lab: Labels) -> None:
        if isinstance(value, torch.Tensor):
            known[value] = lab if isinstance(lab, str) and len(lab) == value.dim() else Axis.UNKNOWN * value.dim()
        elif isinstance(value, (tuple, list)):
            parts = lab if isinstance(lab, tuple) and len(lab) == len(value) else (None,) * len(value)
            for v, part in zip(value, parts):
                store(v, part)

    class _Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            name = op_name(func)
            if not (name == "getitem" and args and isinstance(args[0], (tuple, list))):
                store(result, propagate(name, args, kwargs, AxisEnv(labels_of, shape_of, shapes(result), batch)))
            return result

    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and id(value) in labels:
            known[value] = labels[id(value)]
    with _Mode():
        result = fn(*args, **kwargs)
    if isinstance(result, (tuple, list)):  # (tokens, grid size) and the like: each tensor's labels, None for the rest
        return tuple(known.get(v) if isinstance(v, torch.Tensor) else None for v in result)
    return labels_of(result)
