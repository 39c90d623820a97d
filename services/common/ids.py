"""The one id rule of the project: request ids, product ids and adapter ids.

Ids become storage keys and folder names, so: 1-64 characters of [A-Za-z0-9._-], starting with a
letter or digit (no "..", no hidden ".tmp-*" names). `fullmatch`, because `$` also matches before a
trailing newline.
"""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

# \A and \Z: strict with .match() as well as .fullmatch() (`$` would accept a trailing newline).
ID_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
ID_RULE = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"


def is_valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def check_id(value: str, field: str = "request_id") -> str:
    """`value` if it is a valid id, else INVALID_ARGUMENT naming `field`."""
    if not is_valid_id(value):
        raise InvalidArgument(field, f"{value!r} is not a valid id: use {ID_RULE}")
    return value
