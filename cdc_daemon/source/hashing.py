"""``hash_columns``: a value leaves the daemon as the lower-case hex of HMAC-SHA256(salt, its
text in the object format), NULL staying NULL (docs/design.md, "Columns left out and hashed").

The hash is taken of the CSV field's unquoted text, after the value has its object form
(``Column.csv_expr`` in SQL, ``capture.logical.encode`` from pgoutput), so both capture modes,
every table and every run give the same hash for the same value, and a join on a hashed column
still works in the warehouse. ``FieldHasher`` rewrites those fields in a CSV row: only the
tables that hash a column pay for it; the others' rows stay on the unparsed fast path.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from pydantic import SecretBytes

# What the salt's fingerprint is the HMAC of (``Hasher.fingerprint``).
_SALT_CHECK = b"cdc-daemon salt check"
_QUOTE = 34  # "


class Hasher:
    """HMAC-SHA256 under the salt. The salt is in no repr and no message."""

    __slots__ = ("_keyed",)

    def __init__(self, salt: SecretBytes) -> None:
        # Keyed once; each value copies it (a third cheaper than hmac.new per value).
        self._keyed = hmac.new(salt.get_secret_value(), digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "Hasher(salt=SecretBytes('**********'))"

    def hex(self, text: bytes) -> bytes:
        """The lower-case hex HMAC-SHA256 of ``text`` (64 ASCII bytes)."""
        mac = self._keyed.copy()
        mac.update(text)
        return mac.hexdigest().encode()

    def fingerprint(self) -> str:
        """What the ledger keeps per table to recognise the salt: the HMAC of a fixed text,
        which says nothing about the salt nor about any value."""
        return self.hex(_SALT_CHECK).decode()[:32]


class FieldHasher:
    """Rewrites the fields at ``positions`` (0-based) of one CSV row as COPY (FORMAT csv) and
    ``capture.logical.encode`` write it: a NULL (an empty unquoted field) is kept, any other
    value (an empty string ``""`` too) becomes its hash, which never needs quotes."""

    __slots__ = ("_hasher", "_positions")

    def __init__(self, hasher: Hasher, positions: Sequence[int]) -> None:
        self._hasher = hasher
        self._positions = tuple(sorted(positions))

    def __call__(self, data: bytes | bytearray | memoryview) -> bytes:
        row = bytes(data)  # (COPY hands memoryviews, which cannot be searched)
        hex_ = self._hasher.hex
        out: list[bytes] = []
        done = 0  # row[:done] is in ``out``
        pos = 0  # the start of field ``index``
        index = 0
        size = len(row)
        for target in self._positions:
            while True:
                if pos < size and row[pos] == _QUOTE:
                    # A quoted field ends at a quote not followed by another.
                    end = pos + 1
                    while True:
                        end = row.index(b'"', end)
                        if end + 1 < size and row[end + 1] == _QUOTE:
                            end += 2
                            continue
                        break
                    end += 1
                    quoted = True
                else:
                    comma = row.find(b",", pos)
                    end = size if comma < 0 else comma
                    quoted = False
                if index == target:
                    break
                pos, index = end + 1, index + 1
            if quoted:
                out += (row[done:pos], hex_(row[pos + 1 : end - 1].replace(b'""', b'"')))
                done = end
            elif end > pos:
                out += (row[done:pos], hex_(row[pos:end]))
                done = end
            pos, index = end + 1, index + 1
        if not out:
            return row
        out.append(row[done:])
        return b"".join(out)
