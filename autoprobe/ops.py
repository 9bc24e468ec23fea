"""The op registry: what autoprobe knows about each operation, in one entry per op.

Every backend names an op the same way (``op_name``): an fx ``call_function`` target
(``torch.relu_``, ``operator.iadd``, ``F.conv2d``), an fx ``call_method`` name (``"view"``,
``"__getitem__"``) and export's ATen overload (``aten.convolution.default``) all reduce to one
key, and that key finds one ``Op`` in ``OPS``. The entry says:

- its coarse ``kind`` (conv, linear, norm, act, gate, pool, ...), which the detectors match on;
- its norm or activation ``family`` (``batch``, ``relu6``, ...);
- its axis ``rule``, by name: ``axes.py`` holds the rule functions and binds each name once;
- whether it ``moves_axes`` with no rule to follow them (then its output has no layout the ops
  decide, so it can never be a point: see ``axes.propagate``);
- whether its result is a ``view`` of its first argument, or it writes that argument
  ``in_place`` (the fx engine's alias analysis);
- the functional name an ATen op is ``shown`` under (``convolution`` shows as ``conv2d``), so
  export's graphs read like fx's in reports and the lock.

Adding an op means adding one ``Op``: like ``torch.fx.Interpreter`` keeps one method per opcode,
one entry says all of the above, and graph.py, axes.py, backends.py and fx_engine.py read it
rather than keep tables of op names of their own. Modules are classified the same way, by type:
``module_kind`` walks a module's class hierarchy and returns the entry of the nearest registered
class (torch.nn's layers, and timm's and torchvision's when those libraries are loaded); only a
class of unknown third-party code is read by its name.

Example:
    >>> import operator, torch
    >>> op_name(torch.ops.aten.convolution.default), op_name("__getitem__"), op_name(operator.iadd)
    ('convolution', 'getitem', 'iadd')
    >>> OPS["convolution"].kind, OPS["convolution"].rule, OPS["convolution"].shown
    ('conv', 'channels_first', 'conv2d')
    >>> lookup(torch.relu_).family, lookup("view").view, lookup("max_pool2d").kind
    ('relu', True, 'pool')
    >>> module_kind(torch.nn.ReLU6())
    ModuleKind(kind='act', family='relu6', act='')
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import nn

__all__ = [
    "Op", "OPS", "RULE_NAMES", "op_name", "lookup", "shown_name", "act_family", "ModuleKind", "module_kind", "owns_matrix",
    "MODULE_RULE_NAMES", "ModuleClass", "ModulePackage", "module_class", "is_windowed", "is_view", "is_mode_free",
    "is_library_leaf", "is_leaf_module",
]

RULE_NAMES = frozenset(
    {"elementwise", "channels_first", "linear", "addmm", "layer_norm", "embedding", "cat", "stack", "split",
     "unbind", "permute", "transpose", "t", "movedim", "flatten", "unflatten", "view", "squeeze", "unsqueeze",
     "getitem", "slice", "select", "reduce", "matmul", "sdpa", "mha", "expand", "im2col", "col2im"}
)
"""The axis rules an ``Op`` may name; ``axes.py`` binds each to its function (and checks it binds them all)."""


class Op(NamedTuple):
    """One op: how autoprobe reads a call of it.

    Attributes:
        name: the key, ``op_name`` of the call's target (``conv2d``, ``getitem``, ATen's ``convolution``).
        kind: coarse kind (conv, linear, norm, act, gate, pool, attention, softmax, add, mul, cat, matmul,
            resize, reshape, identity), or ``""`` (then a method call is a ``reshape``, a function call ``other``).
        rule: the name of its axis rule in ``axes.py`` (one of ``RULE_NAMES``), or ``""`` for none.
        family: the norm family (batch, layer, group, instance, rms) or activation family (relu, gelu, ...).
        shown: the functional name an ATen op is shown under (``conv2d`` for ``convolution``); ``""``: ``name``.
        moves_axes: it moves axes in a way no rule follows, so its output's layout is unknown (never a point);
            an unnamed op keeps a same-shaped input's labels instead.
        view: its result may share storage with its first argument.
        in_place: it writes into its first argument (Python's augmented assignments, ``setitem``).
        windowed: its output size is its input's less a window, over a stride (conv, pooling, unfold): it
            shrinks a small input to nothing, so an empty output blames the input size.
    """

    name: str
    kind: str = ""
    rule: str = ""
    family: str = ""
    shown: str = ""
    moves_axes: bool = False
    view: bool = False
    in_place: bool = False
    windowed: bool = False


def act_family(name: str) -> str:
    """The activation family of an activation's function or class name: ``leaky_relu`` and ``LeakyReLU`` ->
    ``leakyrelu``, ``swish`` -> ``silu``, every GELU variant -> ``gelu``.

    Example:
        >>> act_family("QuickGELU"), act_family("hard_swish"), act_family("ReLU6")
        ('gelu', 'hardswish', 'relu6')
    """
    lowered = name.lower().replace("_", "").removesuffix("inplace")
    if lowered == "swish":
        return "silu"
    if lowered.startswith("gelu") or lowered == "quickgelu":
        return "gelu"
    if lowered in ("hardswish", "hswish"):
        return "hardswish"
    return lowered


def _ops(kind: str, rule: str, names: Iterable[str], **fields: Any) -> tuple[Op, ...]:
    """Entries for ops that share a kind and a rule; an activation's family is read off its (shown) name."""
    made = []
    for name in names:
        entry = Op(name, kind, rule, **fields)
        if kind == "act" and not entry.family:
            entry = entry._replace(family=act_family(entry.shown or name))
        made.append(entry)
    return tuple(made)


def _aten(kind: str, rule: str, shown: str, names: Iterable[str], **fields: Any) -> tuple[Op, ...]:
    """Entries for ATen ops shown under a functional name (export's spelling of what fx calls ``shown``)."""
    return _ops(kind, rule, names, shown=shown, **fields)


def _index(*groups: tuple[Op, ...]) -> Mapping[str, Op]:
    table: dict[str, Op] = {}
    for entry in (e for group in groups for e in group):
        if entry.name in table:
            raise ValueError(f"op {entry.name!r} is registered twice in autoprobe/ops.py; an op is one entry")
        if entry.rule and entry.rule not in RULE_NAMES:
            raise ValueError(f"op {entry.name!r} names axis rule {entry.rule!r}, which is not in RULE_NAMES")
        table[entry.name] = entry
    return MappingProxyType(table)


_ELEMENTWISE_MATH = (
    "div", "truediv", "floordiv", "true_divide", "floor_divide", "pow", "mod", "neg", "abs", "exp", "log", "log1p",
    "expm1", "sqrt", "rsqrt", "sin", "cos", "threshold", "logsigmoid", "softsign",
    "tanhshrink", "hardshrink", "softshrink", "clamp", "clamp_min", "clamp_max", "clip", "where", "masked_fill",
    "maximum", "minimum", "fmax", "fmin", "sign", "square", "reciprocal", "erf", "addcmul", "addcdiv", "lerp",
    "round", "floor", "ceil", "trunc", "frac", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "bitwise_not",
    "nan_to_num", "flip", "gather", "tile", "cumsum", "cumprod", "scatter", "scatter_add", "index_add",
    "index_copy", "index_put", "masked_scatter", "softmin", "logit", "normalize", "layer_scale", "idiv",
)
"""Elementwise ops of no particular kind (their output keeps the inputs' labels)."""

OPS: Mapping[str, Op] = _index(
    # ---- weight layers
    _ops("conv", "channels_first", ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                                     "conv_transpose3d"), windowed=True),
    _aten("conv", "channels_first", "conv2d", ("convolution", "_convolution"), windowed=True),
    _ops("linear", "linear", ("linear",)),
    _aten("linear", "addmm", "linear", ("addmm",)),
    _ops("", "matmul", ("bilinear",)),
    _ops("", "embedding", ("embedding",)),
    _ops("", "im2col", ("im2col",), windowed=True),
    # ---- normalization
    _ops("norm", "channels_first", ("batch_norm",), family="batch"),
    _aten("norm", "channels_first", "batch_norm", ("native_batch_norm", "_native_batch_norm_legit",
                                                   "_native_batch_norm_legit_no_training",
                                                   "_native_batch_norm_legit_functional"), family="batch"),
    _ops("norm", "channels_first", ("group_norm",), family="group"),
    _aten("norm", "channels_first", "group_norm", ("native_group_norm",), family="group"),
    _ops("norm", "channels_first", ("instance_norm",), family="instance"),
    _ops("norm", "layer_norm", ("layer_norm",), family="layer"),
    _aten("norm", "layer_norm", "layer_norm", ("native_layer_norm",), family="layer"),
    _ops("norm", "layer_norm", ("rms_norm",), family="rms"),
    _ops("", "layer_norm", ("_fused_rms_norm",)),
    _ops("", "channels_first", ("cudnn_batch_norm", "local_response_norm")),
    # ---- activations and gates
    _ops("act", "elementwise", ("relu", "relu6", "gelu", "silu", "hardswish", "mish", "leaky_relu", "elu", "selu",
                                "celu", "softplus", "tanh", "prelu", "quick_gelu", "gelu_tanh", "swish",
                                "hard_swish", "star_relu")),
    _aten("act", "elementwise", "relu6", ("hardtanh",)),
    _ops("act", "", ("squared_relu",)),
    _aten("act", "", "prelu", ("_prelu_kernel",)),
    _ops("gate", "elementwise", ("sigmoid", "hardsigmoid", "hard_sigmoid")),
    _ops("softmax", "elementwise", ("softmax", "log_softmax")),
    _aten("softmax", "elementwise", "softmax", ("_softmax", "_safe_softmax")),
    _aten("softmax", "elementwise", "log_softmax", ("_log_softmax",)),
    # ---- pooling and resizing
    _ops("pool", "channels_first", ("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
                                     "avg_pool3d", "lp_pool2d", "max_pool2d_with_indices"), windowed=True),
    _ops("pool", "channels_first", ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                                     "adaptive_avg_pool3d")),
    _aten("pool", "channels_first", "adaptive_avg_pool2d", ("_adaptive_avg_pool2d",)),
    _aten("pool", "channels_first", "adaptive_avg_pool3d", ("_adaptive_avg_pool3d",)),
    _ops("", "channels_first", ("lp_pool1d", "lp_pool3d", "max_pool1d_with_indices", "max_pool3d_with_indices"),
         windowed=True),
    _ops("", "channels_first", ("adaptive_max_pool1d", "adaptive_max_pool3d", "fractional_max_pool2d",
                                "grid_sample")),
    _ops("", "col2im", ("fold", "col2im")),
    _ops("resize", "channels_first", ("interpolate", "upsample", "upsample_bilinear", "upsample_nearest")),
    _aten("resize", "channels_first", "interpolate",
          ("upsample_bilinear2d", "upsample_nearest2d", "upsample_bicubic2d", "upsample_linear1d",
           "upsample_nearest1d", "upsample_trilinear3d", "upsample_nearest3d", "_upsample_bilinear2d_aa",
           "_upsample_bicubic2d_aa", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
           "_upsample_nearest_exact3d")),
    _ops("resize", "channels_first", ("pixel_shuffle",), moves_axes=True),
    _aten("resize", "channels_first", "pixel_shuffle", ("pixel_unshuffle",), moves_axes=True, windowed=True),
    # ---- attention and products of activations
    _ops("attention", "sdpa", ("scaled_dot_product_attention",)),
    _aten("attention", "sdpa", "scaled_dot_product_attention",
          ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention")),
    _ops("", "sdpa", ("_scaled_dot_product_attention_math",)),
    _ops("attention", "mha", ("multi_head_attention_forward",)),
    _aten("attention", "mha", "multi_head_attention_forward", ("_native_multi_head_attention",)),
    _ops("matmul", "matmul", ("matmul", "bmm", "einsum", "baddbmm", "mm")),
    # ---- merges
    _ops("add", "elementwise", ("add", "sub")),
    _ops("add", "elementwise", ("iadd",), in_place=True),
    _aten("add", "elementwise", "sub", ("rsub",)),
    _ops("mul", "elementwise", ("mul",)),
    _ops("mul", "elementwise", ("imul",), in_place=True),
    _ops("", "elementwise", ("isub", "itruediv"), in_place=True),
    _ops("", "", ("ifloordiv", "imod", "ipow", "iand", "ior", "ixor", "ilshift", "irshift", "imatmul"),
         in_place=True),
    _ops("", "elementwise", ("setitem",), in_place=True),
    _ops("cat", "cat", ("cat", "concat", "concatenate")),
    _ops("cat", "stack", ("stack",)),
    _ops("", "stack", ("hstack", "vstack")),
    # ---- elementwise, identities and copies
    _ops("", "elementwise", _ELEMENTWISE_MATH),
    _ops("", "elementwise", ("copy", "fill", "zero", "zeros_like", "ones_like", "empty_like", "full_like",
                             "rand_like", "randn_like", "requires_grad", "dropout3d", "reflection_pad3d",
                             "replication_pad1d", "replication_pad3d")),
    _ops("", "elementwise", ("float", "double", "half", "bfloat16", "type"), view=True),
    _ops("identity", "elementwise", ("dropout", "dropout1d", "dropout2d", "drop_path", "identity", "clone")),
    _aten("identity", "elementwise", "identity", ("alias", "lift_fresh_copy", "_to_copy", "feature_dropout",
                                                  "alpha_dropout", "feature_alpha_dropout", "native_dropout")),
    _aten("identity", "elementwise", "identity", ("detach", "to", "type_as"), view=True),
    _ops("", "", ("cpu", "cuda", "real"), view=True),
    # ---- ops that move or select axes
    _ops("reshape", "", ("getattr",)),
    _ops("reshape", "getitem", ("getitem",), view=True),
    _aten("reshape", "slice", "getitem", ("slice",)),
    _aten("reshape", "", "getitem", ("index", "diagonal"), moves_axes=True),
    _aten("reshape", "", "getitem", ("as_strided",), moves_axes=True, view=True),
    _ops("", "", ("rot90",), moves_axes=True),
    _ops("", "", ("unfold",), moves_axes=True, windowed=True),
    _ops("reshape", "elementwise", ("index_select", "pad", "repeat", "roll")),
    _ops("reshape", "elementwise", ("narrow", "contiguous"), view=True),
    _aten("reshape", "elementwise", "pad", ("constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
                                            "replication_pad2d")),
    _ops("reshape", "expand", ("expand",), view=True),
    _aten("reshape", "expand", "expand", ("expand_as",), view=True),
    _ops("", "expand", ("broadcast_to",)),
    _ops("reshape", "view", ("view", "reshape"), moves_axes=True, view=True),
    _aten("reshape", "view", "view", ("view_as", "reshape_as"), moves_axes=True, view=True),
    _aten("reshape", "view", "view", ("_unsafe_view",), moves_axes=True),
    _ops("", "view", ("_reshape_alias",)),
    _aten("reshape", "channels_first", "view", ("channel_shuffle", "native_channel_shuffle")),
    _ops("reshape", "flatten", ("flatten",), moves_axes=True, view=True),
    _ops("reshape", "unflatten", ("unflatten",), moves_axes=True, view=True),
    _ops("reshape", "permute", ("permute",), moves_axes=True, view=True),
    _ops("reshape", "transpose", ("transpose",), moves_axes=True, view=True),
    _ops("", "transpose", ("swapaxes", "swapdims"), moves_axes=True),
    _ops("reshape", "t", ("t",), moves_axes=True, view=True),
    _ops("", "t", ("numpy_T",)),
    _ops("reshape", "movedim", ("movedim",), moves_axes=True, view=True),
    _ops("", "movedim", ("moveaxis",), moves_axes=True),
    _ops("reshape", "squeeze", ("squeeze",), moves_axes=True, view=True),
    _ops("reshape", "unsqueeze", ("unsqueeze",), moves_axes=True, view=True),
    _ops("reshape", "select", ("select",), view=True),
    _ops("reshape", "split", ("chunk", "split", "tensor_split"), view=True),
    _aten("reshape", "split", "split", ("split_with_sizes", "unsafe_split", "unsafe_split_with_sizes")),
    _ops("", "split", ("unsafe_chunk",)),
    _ops("reshape", "unbind", ("unbind",), view=True),
    # ---- reductions
    _ops("", "reduce", ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "norm", "logsumexp",
                        "median", "argmax", "argmin", "all", "any", "nansum", "nanmean", "std_mean", "var_mean",
                        "linalg_vector_norm")),
)
"""Every op autoprobe knows, by ``op_name``."""


def _raw_name(target: Any) -> str:
    aten = getattr(target, "aten_op", None) or (target if hasattr(target, "_opname") else None)
    if aten is not None:
        name = aten._opname
    elif isinstance(target, str):
        name = target
    else:
        name = getattr(target, "__name__", None) or str(target)
    return name.rsplit(".", 1)[-1]


def op_name(target: Any) -> str:
    """The registry key of a called function, method or ATen op: one normalisation for every backend.

    ATen ops (and export's wrappers of them) give their overload packet's name, functions their
    ``__name__``, methods their own name; a trailing ``_`` (the in-place spelling) is dropped, and a
    Python operator's dunder loses its underscores and, for a registered op, its ``r``/``i`` prefix
    (``__radd__`` -> ``add``, ``__getitem__`` -> ``getitem``).

    Example:
        >>> import torch
        >>> op_name(torch.Tensor.__radd__), op_name("relu_"), op_name(torch.ops.aten.silu_.default)
        ('add', 'relu', 'silu')
    """
    name = _raw_name(target)
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("r", "i")) and name[1:] in OPS:
            name = name[1:]
    return name.rstrip("_") if name not in ("_", "") else name


def lookup(target: Any) -> Op | None:
    """The registry entry of a call's target (anything ``op_name`` reads), or ``None`` for an op no entry names."""
    return OPS.get(op_name(target))


def shown_name(target: Any) -> str:
    """The name a graph shows for an ATen op: its entry's functional spelling (``convolution`` -> ``conv2d``),
    else its name without a private ``_`` prefix (``_adaptive_avg_pool2d``); an in-place op keeps its trailing
    ``_``, as fx shows ``relu_``.

    Example:
        >>> import torch
        >>> aten = torch.ops.aten
        >>> shown_name(aten.native_layer_norm.default), shown_name(aten.mean.dim), shown_name(aten.relu_.default)
        ('layer_norm', 'mean', 'relu_')
    """
    key = op_name(target)
    entry = OPS.get(key)
    shown = entry.shown if entry is not None and entry.shown else key.lstrip("_") or key
    raw = _raw_name(target)
    return shown + "_" if raw.endswith("_") and not raw.endswith("__") and not shown.endswith("_") else shown


# ----------------------------------------------------------------------------- modules, by type

MODULE_RULE_NAMES = frozenset(
    {"elementwise", "same_as_first", "channels_first", "linear", "layer_norm", "embedding", "flatten", "unflatten",
     "mha", "im2col", "col2im"}
)
"""The axis rules a ``ModuleClass`` may name: a module's call read as a call of its functional op, with the
module's attributes as the op's arguments (``layer_norm`` over its ``normalized_shape``, ``flatten`` from its
``start_dim``/``end_dim``); ``same_as_first`` keeps the first input's labels whatever the sizes (a padding grows the
spatial axes). ``axes.py`` binds each name to its function once (and checks it binds them all)."""


class ModuleKind(NamedTuple):
    """What a called module is.

    Attributes:
        kind: coarse kind, as for ``Op.kind``, plus ``weight`` (a block that owns weights but no conv) and
            ``other``.
        family: norm family (batch, layer, group, instance, rms) of a norm, activation family of an act.
        act: the activation family a norm layer applies after normalising (timm's ``BatchNormAct2d``), or ``""``.
    """

    kind: str
    family: str = ""
    act: str = ""


class ModuleClass(NamedTuple):
    """One module class's registry entry: everything autoprobe reads off a module by its type.

    A class without an entry of its own has its nearest registered base's entry, whole (``module_class``): an
    entry of its own replaces every field, as a subclass's method replaces its base's.

    Attributes:
        kind: coarse kind, as for ``ModuleKind.kind``; ``""``: the type says nothing of what it computes (a
            flatten, a padding), so ``module_kind`` reads it as it reads a class without an entry.
        family: the norm family of a norm, the activation family of an act.
        rule: the name of the axis rule a call of it follows (one of ``MODULE_RULE_NAMES``), or ``""``: read as
            a block autoprobe keeps whole (a same-shaped input's labels, a map after its last conv or pooling).
        windowed: its output size is its input's less a window, over a stride (as ``Op.windowed``).
        view: its output is its input reshaped or passed through (``Flatten``, ``Identity``): never a depth's
            point of its own (``placement.depth_points``).
        leaf: another library's one-op module that fx cannot trace through (einops' ``Rearrange`` parses its
            pattern in Python on the input's shape): fx records it as one call, and export's names follow.

    Example:
        >>> ModuleClass("pool", rule="channels_first", windowed=True).kind
        'pool'
    """

    kind: str = ""
    family: str = ""
    rule: str = ""
    windowed: bool = False
    view: bool = False
    leaf: bool = False


class ModulePackage(NamedTuple):
    """What a class's home package implies, whatever the class: true of a package's code, not of a class
    hierarchy (a subclass in a user's code runs the user's forward).

    Attributes:
        prefix: the start of the class's ``__module__``.
        leaf: fx's own leaf rule: its modules are recorded as calls, not traced through.
        mode_free: its modules keep their output shapes in train and eval mode (a dropout, a batch norm, timm's
            conv variants); another library's module could return an auxiliary output in train mode only.
    """

    prefix: str
    leaf: bool = False
    mode_free: bool = False


_PACKAGES: tuple[ModulePackage, ...] = (
    ModulePackage("torch.nn", leaf=True, mode_free=True),
    ModulePackage("torch.ao.nn", leaf=True, mode_free=True),
    ModulePackage("torch.", mode_free=True),
    ModulePackage("timm.layers.", mode_free=True),
    ModulePackage("torchvision.ops.", mode_free=True),
)
"""The packages autoprobe knows; a class's facts are those of every prefix its ``__module__`` starts with."""

# fx's leaf rule keeps containers out: a Sequential is traced through, a ModuleList or ModuleDict is never called.
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def owns_matrix(module: nn.Module, recurse: bool = False) -> bool:
    """Whether ``module`` (or, with ``recurse``, anything inside it) owns a weight of two or more dimensions."""
    return any(p.dim() >= 2 for p in module.parameters(recurse=recurse))


def _torch_classes() -> dict[type, ModuleClass]:
    """torch.nn's classes, by type (built when first asked for: the table holds classes, not names)."""
    conv, pool, norm = nn.modules.conv, nn.modules.pooling, nn.modules.batchnorm
    padding = nn.modules.padding
    table: dict[type, ModuleClass] = {}
    # Every torch.nn activation is an elementwise ``act`` of its own class's family, unless registered below.
    activation = nn.modules.activation
    for name in activation.__all__:
        cls = getattr(activation, name)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            table[cls] = ModuleClass("act", act_family(name), "elementwise")
    windowed_pool = ModuleClass("pool", rule="channels_first", windowed=True)
    table.update({
        conv._ConvNd: ModuleClass("conv", rule="channels_first", windowed=True),
        nn.Linear: ModuleClass("linear", rule="linear"),
        nn.Bilinear: ModuleClass("linear"),
        nn.Embedding: ModuleClass(rule="embedding"),
        nn.Identity: ModuleClass("identity", rule="elementwise", view=True),
        nn.modules.dropout._DropoutNd: ModuleClass("identity", rule="elementwise"),
        nn.MultiheadAttention: ModuleClass("attention", rule="mha"),
        # Batch and instance norms both derive from _NormBase; a third-party subclass of it keeps its channels first.
        norm._NormBase: ModuleClass(rule="channels_first"),
        norm._BatchNorm: ModuleClass("norm", "batch", "channels_first"),
        nn.modules.instancenorm._InstanceNorm: ModuleClass("norm", "instance", "channels_first"),
        nn.LayerNorm: ModuleClass("norm", "layer", "layer_norm"),
        nn.GroupNorm: ModuleClass("norm", "group", "channels_first"),
        nn.LocalResponseNorm: ModuleClass("norm", "localresponsenorm", "channels_first"),
        nn.Sigmoid: ModuleClass("gate", rule="elementwise"),
        nn.Hardsigmoid: ModuleClass("gate", rule="elementwise"),
        nn.LogSigmoid: ModuleClass("gate", rule="elementwise"),
        nn.Softmax: ModuleClass("softmax", rule="elementwise"),
        nn.LogSoftmax: ModuleClass("softmax", rule="elementwise"),
        pool._MaxPoolNd: windowed_pool,
        pool._AvgPoolNd: windowed_pool,
        pool._LPPoolNd: windowed_pool,
        pool._AdaptiveAvgPoolNd: ModuleClass("pool", rule="channels_first"),
        pool._AdaptiveMaxPoolNd: ModuleClass("pool", rule="channels_first"),
        **dict.fromkeys((pool._MaxUnpoolNd, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d), ModuleClass("pool")),
        nn.Upsample: ModuleClass("resize", rule="channels_first"),
        nn.PixelShuffle: ModuleClass("resize", rule="channels_first"),
        nn.PixelUnshuffle: ModuleClass(rule="channels_first", windowed=True),
        nn.ChannelShuffle: ModuleClass(rule="channels_first"),
        nn.Unfold: ModuleClass(rule="im2col", windowed=True),
        nn.Fold: ModuleClass(rule="col2im"),
        nn.Flatten: ModuleClass(rule="flatten", view=True),
        nn.Unflatten: ModuleClass(rule="unflatten", view=True),
        # ZeroPad2d & co. grow the spatial axes and keep every label.
        **dict.fromkeys((padding._ConstantPadNd, padding._ReflectionPadNd, padding._ReplicationPadNd,
                         padding._CircularPadNd), ModuleClass(rule="same_as_first")),
    })
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        table[rms] = ModuleClass("norm", "rms", "layer_norm")
    return table


_LIBRARY_CLASSES: Mapping[str, Mapping[str, ModuleClass]] = MappingProxyType({
    # timm's own layers that are not subclasses of torch.nn's (those inherit their entry).
    "timm.layers": MappingProxyType({
        "CondConv2d": ModuleClass("conv"),
        "FrozenBatchNormAct2d": ModuleClass("norm", "batch"),
        **dict.fromkeys(("RmsNorm", "RmsNorm2d"), ModuleClass("norm", "rms")),
        **dict.fromkeys(("DropPath", "DropBlock2d"), ModuleClass("identity")),
        **dict.fromkeys(("Sigmoid", "HardSigmoid"), ModuleClass("gate")),
        **dict.fromkeys(("SelectAdaptivePool2d", "AdaptiveAvgMaxPool2d", "BlurPool2d"), ModuleClass("pool")),
        **{name: ModuleClass("act", act_family(name))
           for name in ("Swish", "Mish", "Tanh", "HardSwish", "GELU", "GELUTanh", "QuickGELU")},
    }),
    "torchvision.ops": MappingProxyType({
        "FrozenBatchNorm2d": ModuleClass("norm", "batch"), "DeformConv2d": ModuleClass("conv"),
    }),
    # fx cannot trace through einops' layers, but each is one op.
    "einops.layers.torch": MappingProxyType(dict.fromkeys(("Rearrange", "Reduce"), ModuleClass(leaf=True))),
})
"""Other libraries' classes, by the module that exports them and the class's name there. A library's entries are
read only once it is imported: a module of its cannot exist before, and autoprobe never imports it for that."""


def _check(table: dict[type, ModuleClass]) -> Mapping[type, ModuleClass]:
    for cls, entry in table.items():
        if entry.rule and entry.rule not in MODULE_RULE_NAMES:
            raise ValueError(f"module class {cls.__qualname__} names axis rule {entry.rule!r}, which is not in "
                             "MODULE_RULE_NAMES")
    return MappingProxyType(table)


# Bounded: one table per set of imported libraries, and a process imports them once (at most one table each).
@functools.lru_cache(maxsize=8)
def _module_classes(libraries: frozenset[str]) -> Mapping[type, ModuleClass]:
    table = _torch_classes()
    for library in sorted(libraries):
        loaded = sys.modules[library]
        for name, entry in _LIBRARY_CLASSES[library].items():
            cls = getattr(loaded, name, None)
            if isinstance(cls, type):
                table[cls] = entry
    return _check(table)


def _entry(cls: type) -> ModuleClass | None:
    """The entry of the nearest registered class in ``cls``'s class hierarchy (most specific first)."""
    table = _module_classes(frozenset(name for name in _LIBRARY_CLASSES if name in sys.modules))
    for base in cls.__mro__:
        found = table.get(base)
        if found is not None:
            return found
    return None


def module_class(module: nn.Module | type[nn.Module]) -> ModuleClass | None:
    """The registry entry of a module, or of a module class: its own class's, else its nearest registered base's.

    Args:
        module: a module, or a module class.

    Returns:
        The entry, or ``None`` for a class none of whose bases is registered.

    Example:
        >>> class Shrink(nn.MaxPool2d):  # a subclass has its registered base's entry
        ...     pass
        >>> module_class(Shrink(2))
        ModuleClass(kind='pool', family='', rule='channels_first', windowed=True, view=False, leaf=False)
        >>> module_class(nn.Flatten).view, module_class(nn.Module)
        (True, None)
    """
    return _entry(module if isinstance(module, type) else type(module))


def _registered(module: nn.Module) -> ModuleKind | None:
    """The kind of ``module``'s registry entry, or ``None`` where it has none or its entry names no kind."""
    entry = module_class(module)
    return ModuleKind(entry.kind, entry.family) if entry is not None and entry.kind else None


def _named(module: nn.Module) -> ModuleKind | None:
    """The kind a third-party class's name implies, for a class none of whose bases is registered.

    A leaf block from code autoprobe has no types for (a model's own ``MyConv``, a Hugging Face layer, a timm
    block that is not registered) offers no type to check: its name, with the weights it owns, is the only
    evidence of what it computes. torch.nn's classes never come here: each is known by its type.
    """
    lowered = type(module).__name__.lower()
    if "conv" in lowered and owns_matrix(module):
        return ModuleKind("conv")
    if "linear" in lowered and owns_matrix(module):
        return ModuleKind("linear")
    if lowered.startswith("drop"):
        return ModuleKind("identity")
    if "attention" in lowered:
        return ModuleKind("attention")
    if "norm" in lowered and "normal" not in lowered and not owns_matrix(module, recurse=True):
        return ModuleKind("norm", next((f for f in _NORM_FAMILIES if f in lowered), lowered))
    if "sigmoid" in lowered:
        return ModuleKind("gate")
    if "pool" in lowered:
        return ModuleKind("pool")
    if "upsample" in lowered:
        return ModuleKind("resize")
    family = act_family(type(module).__name__)
    return ModuleKind("act", family) if family in _ACT_FAMILIES else None


# The families the registry's norm and activation ops spell (what an unknown class's name is matched against).
_NORM_FAMILIES = tuple(dict.fromkeys(op.family for op in OPS.values() if op.kind == "norm"))
_ACT_FAMILIES = frozenset(op.family for op in OPS.values() if op.kind == "act")


def _norm_act(module: nn.Module) -> str:
    act = getattr(module, "act", None)
    if not isinstance(act, nn.Module) or isinstance(act, nn.Identity):
        return ""
    known = _registered(act)
    return known.family if known is not None and known.kind == "act" else act_family(type(act).__name__)


def _package(module: nn.Module) -> tuple[ModulePackage, ...]:
    home = type(module).__module__
    return tuple(p for p in _PACKAGES if home.startswith(p.prefix))


def is_windowed(module: nn.Module | None) -> bool:
    """Whether ``module``'s output size is its input's less a window (a conv, a pooling, an unfold).

    Args:
        module: a module, or ``None`` (a node that calls no module).

    Returns:
        Its registry entry's ``windowed``; ``False`` for ``None`` or a class without an entry.

    Example:
        >>> is_windowed(nn.Conv2d(1, 1, 3)), is_windowed(nn.ReLU()), is_windowed(None)
        (True, False, False)
    """
    entry = module_class(module) if module is not None else None
    return entry is not None and entry.windowed


def is_view(module: nn.Module | None) -> bool:
    """Whether ``module``'s output is its input reshaped or passed through (``Flatten``, ``Identity``).

    Args:
        module: a module, or ``None`` (a node of no module).

    Returns:
        Its registry entry's ``view``; ``False`` for ``None`` or a class without an entry.

    Example:
        >>> is_view(nn.Unflatten(1, (2, 2))), is_view(nn.Conv2d(1, 1, 1)), is_view(None)
        (True, False, False)
    """
    entry = module_class(module) if module is not None else None
    return entry is not None and entry.view


def is_mode_free(module: nn.Module) -> bool:
    """Whether ``module``'s class comes from a package whose modules keep their shapes in both modes.

    A per-package rule (``ModulePackage.mode_free``), not a per-class one: a subclass in a user's code runs the
    user's forward, which may add an output in train mode.

    Args:
        module: a module.

    Returns:
        Whether its class's home package is mode-free.

    Example:
        >>> is_mode_free(nn.Dropout())
        True
    """
    return any(p.mode_free for p in _package(module))


def is_library_leaf(module: nn.Module) -> bool:
    """Whether ``module`` is another library's one-op module fx keeps as one call (an einops ``Rearrange``).

    Args:
        module: a module.

    Returns:
        Its registry entry's ``leaf``; ``False`` for a class without an entry.

    Example:
        >>> is_library_leaf(nn.ReLU())
        False
    """
    entry = module_class(module)
    return entry is not None and entry.leaf


def is_leaf_module(module: nn.Module) -> bool:
    """Whether fx records a call of ``module`` as one node: torch.nn's own modules but containers (fx's own rule,
    ``ModulePackage.leaf``) and another library's one-op modules (``is_library_leaf``). The user's leaf types and
    paths come on top (``TraceOptions``).

    Args:
        module: a module.

    Returns:
        Whether it is a leaf of every trace, whatever the options.

    Example:
        >>> is_leaf_module(nn.Conv2d(1, 1, 1)), is_leaf_module(nn.Sequential()), is_leaf_module(nn.Module())
        (True, False, True)
    """
    if is_library_leaf(module):
        return True
    return any(p.leaf for p in _package(module)) and not isinstance(module, _CONTAINERS)


def module_kind(module: nn.Module) -> ModuleKind:
    """What a called module is: by its type, the entry of the nearest registered class in its class hierarchy;
    for a class of unknown third-party code, what its name implies; else a weight-owning block (``conv`` when a
    convolution is inside, else ``weight``) or ``other``.

    timm's and torchvision's layers are registered only once those libraries are imported: a module of theirs
    cannot exist before, and autoprobe never imports them for it.

    Example:
        >>> class Odd(nn.Conv2d):  # a subclass is what its registered base is, whatever its name
        ...     pass
        >>> module_kind(Odd(1, 1, 1)).kind, module_kind(nn.BatchNorm2d(4)), module_kind(nn.Flatten()).kind
        ('conv', ModuleKind(kind='norm', family='batch', act=''), 'other')
    """
    known = _registered(module)
    if known is None and not type(module).__module__.startswith("torch.nn."):
        known = _named(module)
    if known is not None:
        return known._replace(act=_norm_act(module)) if known.kind == "norm" else known
    if owns_matrix(module, recurse=True):
        # A leaf block (a timm notrace module): it makes channels-first maps when a conv is inside.
        has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
        return ModuleKind("conv" if has_conv else "weight")
    return ModuleKind("other")
