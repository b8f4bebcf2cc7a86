"""A table as the catalog describes it, read once (``read_facts``): its columns, its indexes,
its replica identity, and its key when none is configured (``TableFacts.natural_key``, the one
rule every reader of a key follows). ``source.validate`` checks these facts; the capture and
the warehouse model take the key from here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

import psycopg


@dataclass(frozen=True)
class ColumnFacts:
    name: str
    quoted: str  # quote_ident(): the name as it goes into a statement
    type_name: str  # format_type()
    type_oid: int
    typmod: int
    not_null: bool
    generated: bool  # GENERATED ALWAYS AS (...) STORED
    toastable: bool  # attstorage <> 'p': a value can be kept out of line


def never_out_of_line(type_name: str) -> bool:
    """Whether no value of the type can be stored out of line (TOASTed): PostgreSQL moves only
    values larger than a TOAST pointer (MAXALIGN(18) = 24 bytes with their 4-byte header) out
    of a row. A ``numeric(p, s)`` of at most 28 digits takes at most 22 bytes (the header, 2
    bytes of sign and scale, 2 per 4 digits plus one for the alignment at the point); ``inet``
    and ``cidr`` at most 22 (an IPv6 address with its mask; ``pg_column_size`` shows both)."""
    found = re.fullmatch(r"numeric\((\d+)(?:,\s*\d+)?\)", type_name)
    if found:
        return int(found.group(1)) <= 28
    return type_name in ("inet", "cidr")


@dataclass(frozen=True)
class IndexFacts:
    name: str  # quote_ident(): unqualified, as REPLICA IDENTITY USING INDEX takes it
    columns: tuple[str, ...]  # key columns (INCLUDE columns left out), in index order
    primary: bool
    unique: bool
    valid: bool  # indisvalid, indisready and indislive
    partial: bool
    expressions: bool
    deferrable: bool  # NOT indimmediate: the uniqueness check waits for the statement's end
    replica_identity: bool  # named by REPLICA IDENTITY USING INDEX

    def holds_a_key(self, deferrable_ok: bool = False) -> bool:
        """Unique over its columns at every row change: what a merge key and a replica
        identity need (PostgreSQL takes an index as replica identity on the same terms)."""
        return (
            self.unique
            and self.valid
            and not self.partial
            and not self.expressions
            and (deferrable_ok or not self.deferrable)
        )

    def flaw(self) -> str:
        """Why ``holds_a_key`` is false, in a few words."""
        if not self.unique:
            return "not unique"
        if self.deferrable:
            return "DEFERRABLE"
        if self.partial:
            return "partial (it has a WHERE clause)"
        if self.expressions:
            return "on expressions"
        return "not valid (a failed CREATE INDEX CONCURRENTLY or REINDEX)"


@dataclass(frozen=True)
class TableFacts:
    oid: int
    schema: str
    name: str
    quoted: str  # schema.table as it goes into a statement
    kind: str  # relkind
    identity: str  # relreplident: d default, n nothing, f full, i index
    columns: tuple[ColumnFacts, ...]
    indexes: tuple[IndexFacts, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def primary_key(self) -> IndexFacts | None:
        return next((i for i in self.indexes if i.primary), None)

    def natural_key(self) -> IndexFacts | None:
        """The index whose columns are the table's key when ``[[tables]] key`` names none; the
        one rule every reader of a key follows (``init``, the capture, the warehouse model):

        1. the primary key (flawed or not: the checks then say what is wrong with it);
        2. else the index of ``REPLICA IDENTITY USING INDEX``, if it holds a key (unique, valid,
           not partial, not ``DEFERRABLE``, no expressions) and its columns are NOT NULL: it
           is what pgoutput sends with a delete or a key change;
        3. else the usable unique index (same terms) with the fewest columns, then the first
           by name: deterministic, and ``init`` prints which one it is. A table with several
           is better pinned by ``REPLICA IDENTITY USING INDEX`` or ``[[tables]] key``, which a
           new index cannot displace.

        None: the table has no key (keyless)."""
        if self.primary_key is not None:
            return self.primary_key
        usable = [i for i in self.indexes if self.usable_key(i)]
        named = next((i for i in usable if i.replica_identity), None)
        if named is not None:
            return named
        return min(usable, key=lambda i: (len(i.columns), i.name), default=None)

    def usable_key(self, index: IndexFacts) -> bool:
        """Whether ``index`` can be the key on its own: it holds a key and no column of it
        may be NULL (a unique index lets rows share a NULL)."""
        return index.holds_a_key() and all(
            (c := self.column(n)) is not None and c.not_null for n in index.columns
        )

    def key_columns(self) -> tuple[str, ...]:
        """The columns of ``natural_key`` (empty: keyless)."""
        found = self.natural_key()
        return () if found is None else found.columns

    def key_origin(self, configured: bool) -> str:
        """Where the key comes from, in words: ``[[tables]] key``, the primary key, a unique
        index by name, or nothing."""
        if configured:
            return "[[tables]] key"
        found = self.natural_key()
        if found is None:
            return "no key"
        return "the primary key" if found.primary else f"unique index {found.name}"

    def captured(self, logical: bool) -> tuple[ColumnFacts, ...]:
        """The columns the capture reads: in logical mode not the generated ones, which
        pgoutput (PostgreSQL < 18) does not send; watermark mode copies their stored value."""
        if not logical:
            return self.columns
        return tuple(c for c in self.columns if not c.generated)

    def column(self, name: str) -> ColumnFacts | None:
        return next((c for c in self.columns if c.name == name), None)

    def identity_index(self) -> IndexFacts | None:
        """The index whose columns a delete or key change carries, when it is one PostgreSQL
        accepts (else updates and deletes of a published table fail); None under FULL and
        NOTHING."""
        if self.identity == "d":
            found = self.primary_key
        elif self.identity == "i":
            found = next((i for i in self.indexes if i.replica_identity), None)
        else:
            return None
        return found if found is not None and found.holds_a_key() else None


def read_facts(conn: psycopg.Connection[tuple[object, ...]], table: str) -> TableFacts | None:
    """The catalog facts of ``table`` (resolved by ``to_regclass``), None when it does not exist
    or is not visible."""
    row = conn.execute(
        "SELECT c.oid::int8, n.nspname, c.relname,"
        " quote_ident(n.nspname) || '.' || quote_ident(c.relname),"
        " c.relkind::text, c.relreplident::text"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.oid = to_regclass(%s)",
        (table,),
    ).fetchone()
    if row is None:
        return None
    oid = int(str(row[0]))
    columns = tuple(
        ColumnFacts(
            str(n),
            str(q),
            str(t),
            int(str(o)),
            int(str(m)),
            bool(nn),
            g != "",
            bool(s) and not never_out_of_line(str(t)),
        )
        for n, q, t, o, m, nn, g, s in conn.execute(
            "SELECT attname, quote_ident(attname), format_type(atttypid, atttypmod),"
            " atttypid::int8, atttypmod, attnotnull, attgenerated::text, attstorage <> 'p'"
            " FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
            " ORDER BY attnum",
            (oid,),
        )
    )
    indexes = tuple(
        IndexFacts(
            str(name),
            tuple(str(c) for c in cast("list[object]", cols)),
            bool(primary),
            bool(unique),
            bool(valid),
            bool(partial),
            bool(expressions),
            bool(deferrable),
            bool(replident),
        )
        for name, cols, primary, unique, valid, partial, expressions, deferrable, replident in (
            conn.execute(
                "SELECT quote_ident(x.relname),"
                " ARRAY(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, o)"
                "  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
                "  WHERE k.o <= i.indnkeyatts ORDER BY k.o),"
                " i.indisprimary, i.indisunique, i.indisvalid AND i.indisready AND i.indislive,"
                " i.indpred IS NOT NULL, i.indexprs IS NOT NULL, NOT i.indimmediate,"
                " i.indisreplident"
                " FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid"
                " WHERE i.indrelid = %s ORDER BY i.indisprimary DESC, x.relname",
                (oid,),
            )
        )
    )
    return TableFacts(
        oid, str(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]), columns, indexes
    )


def key_of(conn: psycopg.Connection[tuple[object, ...]], table: str) -> IndexFacts | None:
    """The index whose columns are ``table``'s key when none is configured
    (``TableFacts.natural_key``), read from the catalog; None when it has none or does not
    exist."""
    facts = read_facts(conn, table)
    return None if facts is None else facts.natural_key()
