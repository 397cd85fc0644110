"""Sub-byte packing shared by every kind that stores bits or nibbles (spec/FORMAT.md, section 4):
bit i of a sequence is bit i % 8 (least significant first) of byte i // 8; element 2i of a nibble
sequence is the low nibble of byte i, element 2i+1 the high one, each a 4-bit two's complement."""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> np.ndarray:
    """Bytes of a flat bool tensor (a final partial byte's unused high bits are 0)."""
    return np.packbits(bits.reshape(-1).cpu().numpy(), bitorder="little")


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` bits of uint8 tensor `packed` as a bool tensor, on `packed`'s device."""
    shifts = _SHIFTS.to(packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


class BitPacker:
    """Packs a bit stream handed over in pieces of any length (row blocks of a tensor), carrying
    the bits of an unfinished byte to the next piece, so the bytes equal `pack_bits` of the whole."""

    def __init__(self) -> None:
        self._carry = torch.zeros(0, dtype=torch.bool)

    def add(self, bits: torch.Tensor) -> np.ndarray:
        """Bytes completed by `bits`."""
        bits = torch.cat([self._carry, bits.reshape(-1).cpu()])
        whole = bits.numel() // 8 * 8
        self._carry = bits[whole:]
        return pack_bits(bits[:whole])

    def end(self) -> np.ndarray:
        """The last, partial byte (empty when the stream ended on a byte)."""
        out, self._carry = pack_bits(self._carry), torch.zeros(0, dtype=torch.bool)
        return out


def pack_nibbles(q: torch.Tensor) -> np.ndarray:
    """Bytes of a flat int8 tensor of values in [-8, 7], two per byte (a final odd one in a low nibble)."""
    n = q.reshape(-1).to(torch.uint8) & 0xF
    if n.numel() % 2:
        n = torch.cat([n, n.new_zeros(1)])
    pairs = n.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).cpu().numpy()


#: Each byte's two nibbles (low first) as int8 values in [-8, 7]: one lookup decodes a byte, 3 x
#: faster than masking, shifting and sign-extending it (2M values, one thread).
_NIBBLES = torch.tensor([[(b & 0xF) - 16 * ((b & 0xF) >= 8), (b >> 4) - 16 * (b >= 0x80)] for b in range(256)],
                        dtype=torch.int8)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` nibbles of uint8 tensor `packed` as int8 values in [-8, 7], on its device."""
    table = _NIBBLES.to(packed.device)
    return torch.index_select(table, 0, packed.reshape(-1).to(torch.int32)).reshape(-1)[:n]


__all__ = ["pack_bits", "unpack_bits", "BitPacker", "pack_nibbles", "unpack_nibbles"]
