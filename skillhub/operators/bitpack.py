"""Dense bit packing for plugin authors: the public path of :mod:`skillhub.numerics.bitpack`."""

from skillhub.numerics.bitpack import pack_codes, packed_nbytes, unpack_codes

__all__ = ["pack_codes", "packed_nbytes", "unpack_codes"]
