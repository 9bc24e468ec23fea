"""The axis layout of a feature tensor, as one value type.

A layout names what each axis of a batched tensor holds: ``N`` the batch, ``C`` the
channels (features), ``L`` tokens or a 1-D sequence, ``D``/``H``/``W`` the spatial axes.
It knows its rank, its channel axis and its spatial axes, so the graph, the adapters and
the losses read one definition instead of tables of strings.

``Layout`` is a ``str`` enum: ``Layout.NCHW == "NCHW"``, so JSON, the lockfile and the
schema keep their plain strings. A tensor whose layout the graph cannot derive has
``layout = None`` (never a guess).

Example:
    >>> Layout.NHWC.rank, Layout.NHWC.channel_dim, Layout.NHWC.spatial_dims
    (4, 3, (1, 2))
    >>> Layout.parse("NCDHW").spatial_dims
    (2, 3, 4)
    >>> Layout.parse("NXYZ")
    Traceback (most recent call last):
        ...
    ValueError: unknown layout 'NXYZ'; expected one of NC, NCL, NLC, NCHW, NHWC, NCDHW, NDHWC
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Layout"]


class Layout(str, Enum):
    """Axis layout of a batched feature tensor (batch first)."""

    NC = "NC"
    NCL = "NCL"
    NLC = "NLC"
    NCHW = "NCHW"
    NHWC = "NHWC"
    NCDHW = "NCDHW"
    NDHWC = "NDHWC"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | Layout) -> Layout:
        """The layout called ``name``.

        Raises:
            ValueError: ``name`` is no known layout.
        """
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(member.value for member in cls)
            raise ValueError(f"unknown layout {name!r}; expected one of {known}") from None

    @classmethod
    def channels_first(cls, rank: int) -> Layout:
        """The channels-first layout of a tensor of ``rank`` dims (``NC``, ``NCL``, ``NCHW``, ``NCDHW``)."""
        return _BY_RANK[rank][0]

    @classmethod
    def channels_last(cls, rank: int) -> Layout:
        """The channels-last layout of a tensor of ``rank`` dims (``NC``, ``NLC``, ``NHWC``, ``NDHWC``)."""
        return _BY_RANK[rank][1]

    @property
    def rank(self) -> int:
        """Number of dims, batch included."""
        return len(self.value)

    @property
    def channel_dim(self) -> int:
        """Index of the channel axis (non-negative)."""
        return self.value.index("C")

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Indices of the spatial or token axes, in order; ``()`` for ``NC``."""
        return tuple(i for i, axis in enumerate(self.value) if axis not in "NC")

    @property
    def is_channels_last(self) -> bool:
        """Whether the channels are the last axis of a tensor with spatial axes (``NLC``, ``NHWC``, ``NDHWC``)."""
        return self.rank > 2 and self.channel_dim == self.rank - 1

    @property
    def is_tokens(self) -> bool:
        """Whether the one spatial axis is a token sequence read as ``(B, L, C)`` (``NLC``)."""
        return self is Layout.NLC

    def channels(self, shape: tuple[int, ...]) -> int:
        """The channel count of a tensor of this layout."""
        return shape[self.channel_dim]

    def spatial(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The spatial extent (or token count) of a tensor of this layout; ``()`` for ``NC``."""
        return tuple(shape[d] for d in self.spatial_dims)


_BY_RANK: dict[int, tuple[Layout, Layout]] = {
    2: (Layout.NC, Layout.NC),
    3: (Layout.NCL, Layout.NLC),
    4: (Layout.NCHW, Layout.NHWC),
    5: (Layout.NCDHW, Layout.NDHWC),
}
