"""Compression operators: the protocol every operator honours (``protocol``, all a plugin
imports), discovery through the ``skillhub.operators`` entry points (``discovery``), and the
built-in operators (``builtin``), which register through the same entry points as plugins.
``skillhub.operators.bitpack`` stays importable for plugins (it lives in skillhub.numerics).

Layer 2: imports layers 0-1 (errors, config, io, numerics).
"""

from skillhub.operators.protocol import (
    BlockEncoded,
    DeltaBlocks,
    EncodeContext,
    Encoded,
    FieldLayout,
    LayerStatistics,
    Operator,
    expected_fields,
    meta_int,
    resolve_params,
)
from skillhub.operators.parts import Split, decode_split, expected_split_fields  # noqa: E402
from skillhub.operators.encoding import EncodedModule, encode_module, stored_bytes  # noqa: E402
from skillhub.operators.discovery import (  # noqa: E402,I001  (discovery needs the protocol)
    ENTRY_POINT_GROUP,
    catalog,
    decoder_for,
    get_operator,
    operator_names,
    provenance,
)

__all__ = [
    "BlockEncoded", "DeltaBlocks", "ENTRY_POINT_GROUP", "EncodeContext", "Encoded", "EncodedModule", "FieldLayout", "LayerStatistics", "Operator",
    "Split", "catalog", "decode_split", "decoder_for", "encode_module", "expected_fields", "expected_split_fields", "get_operator", "meta_int", "operator_names", "provenance",
    "resolve_params", "stored_bytes",
]
