"""``source.hashing``: the hashed fields of a CSV row as COPY writes it, for any values."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretBytes

from cdc_daemon.source.hashing import FieldHasher, Hasher

SALT = b"unit-test-salt-of-16+"


def field(value: str | None) -> bytes:
    """One value as COPY (FORMAT csv) writes it: NULL empty, quoted when empty or holding a
    comma, a quote, CR or LF."""
    if value is None:
        return b""
    data = value.encode()
    if not data or any(c in data for c in b',"\r\n'):
        return b'"' + data.replace(b'"', b'""') + b'"'
    return data


values = st.one_of(st.none(), st.text(alphabet=st.sampled_from(list('ab,"\r\n é')), max_size=8))


@given(st.lists(values, min_size=1, max_size=6), st.data())
def test_the_hashed_fields_are_the_hmac_of_their_text_and_the_rest_untouched(
    row: list[str | None], data: st.DataObject
) -> None:
    """For any row (commas, quotes, CR/LF, empty strings, NULLs, non-ASCII) and any chosen
    columns: each chosen non-NULL field becomes the hex HMAC-SHA256 of its unquoted text, a
    NULL stays an empty field, every other byte of the row is unchanged; with a line end after
    it (a COPY row) too."""
    positions = data.draw(st.sets(st.integers(0, len(row) - 1)))
    hasher = FieldHasher(Hasher(SecretBytes(SALT)), sorted(positions))
    expected = [
        hmac.new(SALT, v.encode(), hashlib.sha256).hexdigest().encode()
        if i in positions and v is not None
        else field(v)
        for i, v in enumerate(row)
    ]
    encoded = b",".join(field(v) for v in row)
    assert hasher(encoded) == b",".join(expected)
    assert hasher(memoryview(encoded + b",I,7\n")) == b",".join(expected) + b",I,7\n"


def test_the_salt_is_in_no_repr_and_its_fingerprint_says_nothing_of_it() -> None:
    """The hasher's repr hides the salt; the fingerprint is an HMAC of a fixed text (so the
    same salt always has the same one, another salt another)."""
    hasher = Hasher(SecretBytes(SALT))
    assert SALT.decode() not in repr(hasher)
    assert SALT.decode() not in hasher.fingerprint()
    assert hasher.fingerprint() == Hasher(SecretBytes(SALT)).fingerprint()
    assert hasher.fingerprint() != Hasher(SecretBytes(SALT + b"x")).fingerprint()
