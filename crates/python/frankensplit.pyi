"""FrankenSplit's CompressAI-compatible entropy coder and edge encoder (no torch).

Strings from ``EntropyBottleneck.compress`` are byte-identical to those of
``compressai.entropy_models.EntropyBottleneck.compress`` (CompressAI 1.2.x),
and ``decompress`` reads CompressAI's strings. Batches are coded on several
threads with the GIL released.
"""

from os import PathLike
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

ArrayLike = Any
"""Anything ``numpy.asarray`` takes: numpy arrays, lists, CPU torch tensors."""

class EntropyBottleneck:
    """CompressAI's factorized prior, ready to code: CDF tables and per-channel medians."""

    @staticmethod
    def from_state_dict(
        state_dict: Mapping[str, ArrayLike],
        prefix: str = "entropy_bottleneck.",
        formula: Optional[str] = None,
    ) -> "EntropyBottleneck":
        """From a CompressAI model's state dict, in either naming
        (``matrices.0`` since 1.2.7, ``_matrix0`` before).

        With ``formula=None`` the state dict's own tables (``_quantized_cdf``,
        ``_cdf_length``, ``_offset``, written by ``update()``) are used; without
        them, or with ``formula`` given, the tables are built from the density
        as ``update()`` does: ``"direct"`` (CompressAI >= 1.2.5, the default for
        new names) or ``"sign-flipped"`` (<= 1.2.4, the default for old names).
        """
    @staticmethod
    def from_tables(
        quantized_cdf: ArrayLike, cdf_length: ArrayLike, offset: ArrayLike, medians: ArrayLike
    ) -> "EntropyBottleneck":
        """From CompressAI's buffers: ``quantized_cdf`` (C, W), ``cdf_length`` (C,),
        ``offset`` (C,), and the medians ``quantiles[:, 0, 1]`` (C,)."""
    @staticmethod
    def from_bundle(path: Union[str, PathLike]) -> "EntropyBottleneck":
        """The coder of a FrankenSplit bundle directory."""
    @property
    def channels(self) -> int: ...
    @property
    def medians(self) -> npt.NDArray[np.float32]:
        """Per-channel medians, (C,)."""
    def tables(self) -> Tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """``(quantized_cdf (C, W), cdf_length (C,), offset (C,))`` as CompressAI lays them out."""
    def compress(self, y: ArrayLike) -> List[bytes]:
        """``y`` (N, C, H, W) → one string per latent, as CompressAI's ``compress(y)``."""
    def decompress(self, strings: Sequence[bytes], size: Sequence[int]) -> npt.NDArray[np.float32]:
        """Strings → dequantised latents (N, C, H, W); ``size`` is (H, W) as in
        CompressAI, or (C, H, W)."""
    def decompress_symbols(self, strings: Sequence[bytes], size: Sequence[int]) -> npt.NDArray[np.int32]:
        """Strings → integer symbols (N, C, H, W) before the medians are added,
        as CompressAI's ``quantize(y, "symbols", medians)``."""

class Encoder:
    """A bundle's edge encoder: image → payload, as ``frankensplit-edge encode`` writes it."""

    def __init__(
        self,
        bundle: Union[str, PathLike],
        int8: bool = False,
        calibration: Optional[Union[str, PathLike]] = None,
        threads: int = 1,
    ) -> None:
        """Opens a bundle directory; ``int8`` runs g_a in 8-bit integers with the
        bundle's calibration (or the file ``calibration``)."""
    @property
    def fingerprint(self) -> str:
        """The model's fingerprint (8 hex digits), as payloads carry it."""
    @property
    def latent_shape(self) -> Tuple[int, int, int]: ...
    @property
    def input_size(self) -> int: ...
    @property
    def entropy_bottleneck(self) -> EntropyBottleneck: ...
    def encode(self, image: Union[str, PathLike, npt.NDArray[np.uint8]]) -> bytes:
        """An image file (JPEG, PNG, WebP) or an RGB ``uint8 (H, W, 3)`` array → payload."""
    def encode_latent(self, image: Union[str, PathLike, npt.NDArray[np.uint8]]) -> npt.NDArray[np.float32]:
        """An image → g_a's latent (C, H, W), before rounding."""

class Payload:
    """FrankenSplit's container: model fingerprint, latent shape, raw CompressAI string."""

    fingerprint: str
    shape: Tuple[int, int, int]
    def __init__(self, fingerprint: str, shape: Tuple[int, int, int], string: bytes) -> None: ...
    @staticmethod
    def parse(data: bytes) -> "Payload":
        """Parses a payload; ``ValueError`` if malformed."""
    @staticmethod
    def build(fingerprint: str, shape: Tuple[int, int, int], string: bytes) -> bytes:
        """The bytes of a payload of ``string``."""
    @property
    def string(self) -> bytes:
        """The raw CompressAI string inside."""
    def to_bytes(self) -> bytes: ...
