"""What every MES channel shares: the input model, field mapping and parsing to NewEvent.

parse_mes_payload(obj, mapping, *, constants=None, extra_uom_codes=(), drop_empty=False)
    -> NewEvent                      raises MesInputError(field_path, message, errors)
parse_mes_batch(items, mapping, *, extra_uom_codes=()) -> (events, [(index, MesInputError)])
FieldMapping                         the ``mapping`` table of a source's config
"""

from adapters.sources.mes_common.mapping import (
    ENVELOPE_FIELDS,
    FieldMapping,
    apply_mapping,
    get_path,
)
from adapters.sources.mes_common.parse import (
    MesEvent,
    MesInputError,
    parse_mes_batch,
    parse_mes_payload,
)

__all__ = [
    "ENVELOPE_FIELDS",
    "FieldMapping",
    "MesEvent",
    "MesInputError",
    "apply_mapping",
    "get_path",
    "parse_mes_batch",
    "parse_mes_payload",
]
