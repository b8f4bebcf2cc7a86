"""The prerequisite checks of ``source.validate`` as pure functions over catalog facts: which
key and replica identity combinations are refused, with which fix, in which mode."""

from __future__ import annotations

import pytest

from cdc_daemon.source.catalog import ColumnFacts, IndexFacts, TableFacts
from cdc_daemon.source.validate import (
    generated_notes,
    identity_line,
    logical_problems,
    name_problems,
    quote_ident,
    watermark_problems,
)


def col(name: str, not_null: bool = True, generated: bool = False) -> ColumnFacts:
    return ColumnFacts(name, quote_ident(name), "integer", 23, -1, not_null, generated, False)


def index(
    name: str,
    *columns: str,
    primary: bool = False,
    unique: bool = True,
    deferrable: bool = False,
    partial: bool = False,
    valid: bool = True,
    identity: bool = False,
) -> IndexFacts:
    return IndexFacts(name, columns, primary, unique, valid, partial, False, deferrable, identity)


def table(identity: str, columns: list[ColumnFacts], indexes: list[IndexFacts]) -> TableFacts:
    return TableFacts(
        1, "Odd Shop", "accts", '"Odd Shop".accts', "r", identity, tuple(columns), tuple(indexes)
    )


PK = index("accts_pkey", "aid", primary=True)
EMAIL = index("accts_email_key", "email")
COLUMNS = [col("aid"), col("email"), col("note", not_null=False)]


def test_the_primary_key_under_the_default_identity_is_accepted() -> None:
    """The common case: the primary key is the key and the default identity sends it."""
    facts = table("d", COLUMNS, [PK, EMAIL])
    assert logical_problems(facts, ("aid",), configured=False) == []


@pytest.mark.parametrize(
    ("identity", "indexes", "sends"),
    [
        ("d", [PK, EMAIL], "REPLICA IDENTITY DEFAULT sends (aid)"),
        (
            "i",
            [PK, index("accts_aid", "aid", identity=True), EMAIL],
            "USING INDEX accts_aid sends (aid)",
        ),
    ],
)
def test_a_key_the_identity_does_not_send_is_refused(
    identity: str, indexes: list[IndexFacts], sends: str
) -> None:
    """key = email while the identity sends aid: a delete or an email change would leave the
    old email in the warehouse, so it is refused with the statement that makes the identity
    send the key (or FULL)."""
    (problem,) = logical_problems(table(identity, COLUMNS, indexes), ("email",), configured=True)
    assert f"{sends} with a delete or a key change, not the key (email)" in problem
    assert 'ALTER TABLE "Odd Shop".accts REPLICA IDENTITY USING INDEX accts_email_key' in problem
    assert "REPLICA IDENTITY FULL" in problem


@pytest.mark.parametrize("identity", ["f", "i"])
def test_a_key_the_identity_sends_is_accepted(identity: str) -> None:
    """Under FULL any key is sent; under USING INDEX the key of that index is."""
    email = index("accts_email_key", "email", identity=identity == "i")
    assert logical_problems(table(identity, COLUMNS, [PK, email]), ("email",), True) == []


def test_a_nullable_or_non_unique_key_is_refused_in_both_modes() -> None:
    """A NULL key cannot be merged and a key two rows share collapses them: both are refused,
    in logical and in watermark mode, each with its statement."""
    facts = table("f", COLUMNS, [PK, index("accts_note", "note", unique=False)])
    for problems in (
        logical_problems(facts, ("note",), configured=True),
        watermark_problems(facts, ("note",)),
    ):
        nullable, not_unique = problems
        assert 'ALTER TABLE "Odd Shop".accts ALTER COLUMN note SET NOT NULL' in nullable
        assert "CREATE UNIQUE INDEX CONCURRENTLY accts_cdc_key" in not_unique
        assert "merged into one" in not_unique


@pytest.mark.parametrize(
    ("flaw", "words"),
    [
        ({"partial": True}, "partial"),
        ({"valid": False}, "not valid"),
        ({"deferrable": True}, "DEFERRABLE"),
    ],
)
def test_a_unique_index_that_does_not_hold_the_key_is_named(
    flaw: dict[str, bool], words: str
) -> None:
    """A partial, invalid or deferrable unique index on the key is no proof of uniqueness:
    refused, naming the index and its flaw."""
    facts = table("f", COLUMNS, [PK, index("accts_email_key", "email", **flaw)])
    (problem,) = logical_problems(facts, ("email",), configured=True)
    assert f"only the unique index accts_email_key, which is {words}" in problem


def test_a_deferrable_primary_key_is_refused_in_logical_mode_only() -> None:
    """A deferrable primary key cannot be the replica identity (the application's UPDATE and
    DELETE would fail once published) nor a key the changes can be applied by; the fix adds a
    unique index and makes it the identity. Watermark mode reads committed rows, where a
    deferred constraint holds: accepted there."""
    facts = table("d", COLUMNS, [index("accts_pkey", "aid", primary=True, deferrable=True)])
    (problem,) = logical_problems(facts, ("aid",), configured=False)
    assert "UPDATE and DELETE would fail" in problem
    assert problem.endswith(
        'CREATE UNIQUE INDEX CONCURRENTLY accts_cdc_key ON "Odd Shop".accts (aid), then '
        'ALTER TABLE "Odd Shop".accts REPLICA IDENTITY USING INDEX accts_cdc_key'
    )
    assert watermark_problems(facts, None) == []


@pytest.mark.parametrize(
    ("identity", "indexes", "reason", "fix"),
    [
        ("n", [PK], "REPLICA IDENTITY NOTHING", "REPLICA IDENTITY DEFAULT"),
        ("d", [EMAIL], "no primary key", "REPLICA IDENTITY USING INDEX accts_email_key"),
        ("i", [PK, EMAIL], "was dropped", "REPLICA IDENTITY DEFAULT"),
        (
            "i",
            [PK, index("accts_note", "note", identity=True, valid=False)],
            "not valid",
            "REPLICA IDENTITY DEFAULT",
        ),
    ],
)
def test_an_identity_that_would_break_the_applications_writes_is_refused(
    identity: str, indexes: list[IndexFacts], reason: str, fix: str
) -> None:
    """NOTHING, DEFAULT without a primary key, USING INDEX on a dropped or invalid index: once
    published, the table's UPDATE and DELETE would fail; refused with the identity to set."""
    key = ("email",) if not any(i.primary for i in indexes) else ("aid",)
    (problem,) = logical_problems(table(identity, COLUMNS, indexes), key, configured=True)
    assert reason in problem
    assert "the application's UPDATE and DELETE would fail" in problem
    assert f'ALTER TABLE "Odd Shop".accts {fix}' in problem


def test_no_key_is_refused_in_logical_mode_only() -> None:
    """Logical mode needs a merge key; watermark mode without one is the warehouse side's
    concern (it refuses to render the table)."""
    facts = table("d", [col("a"), col("b")], [])
    (problem,) = logical_problems(facts, (), configured=False)
    assert "has no primary key" in problem
    assert watermark_problems(facts, None) == []


def test_reserved_and_case_colliding_names_are_refused_in_both_modes() -> None:
    """A column named like the daemon's own columns (any case) and two columns equal but for
    case would be one Snowflake column: each refused with the rename, in both modes."""
    columns = [col("aid"), col("userId"), col("userid"), col("_Merged_At"), col("_file_row")]
    facts = table("d", columns, [PK])
    for problems in (logical_problems(facts, ("aid",), False), watermark_problems(facts, None)):
        assert len(problems) == 3
        assert '"_Merged_At" has the name of the daemon\'s own column _merged_at' in problems[0]
        assert "_file_row has the name of the daemon's own column _file_row" in problems[1]
        assert '"userId" and userid differ only in case' in problems[2]
        assert all("RENAME COLUMN" in p for p in problems)


def test_generated_columns_are_left_out_in_logical_mode() -> None:
    """A generated column is not captured in logical mode: its name cannot collide there, it
    cannot be the key, and init prints one line for it; watermark mode keeps it."""
    facts = table("d", [col("aid"), col("_cdc_op", generated=True)], [PK])
    assert name_problems(facts, logical=True) == []
    assert len(name_problems(facts, logical=False)) == 1
    assert [c.name for c in facts.captured(logical=True)] == ["aid"]
    (note,) = generated_notes(facts)
    assert "generated column _cdc_op is left out" in note
    generated_key = table("f", [col("aid"), col("g", generated=True)], [index("g_key", "g")])
    (problem,) = logical_problems(generated_key, ("g",), configured=True)
    assert "generated column" in problem
    assert watermark_problems(generated_key, ("g",)) == []


def test_a_made_up_index_name_fits_postgresql_and_is_quoted() -> None:
    """The suggested index name is cut to 63 bytes (PostgreSQL would cut it silently, and the
    REPLICA IDENTITY statement would then name no index) and quoted when it must be."""
    long = TableFacts(1, "s", "é" * 40, "x", "r", "f", (col("a", not_null=False),), ())
    (_, problem) = logical_problems(long, ("a",), configured=True)
    name = problem.split("CONCURRENTLY ", 1)[1].split(" ON ", 1)[0]
    assert name.startswith('"')
    assert len(name.strip('"').encode()) <= 63
    assert quote_ident("Sign-Ups") == '"Sign-Ups"'
    assert quote_ident('a"b') == '"a""b"'


def test_small_values_are_never_toasted() -> None:
    """A numeric of at most 28 digits, inet and cidr fit under a TOAST pointer: init does not
    warn about their unchanged values; wider numerics, text and arrays may be TOASTed."""
    from cdc_daemon.source.catalog import never_out_of_line

    assert never_out_of_line("numeric(10,2)")
    assert never_out_of_line("numeric(28,0)")
    assert never_out_of_line("inet")
    assert not never_out_of_line("numeric(29,2)")
    assert not never_out_of_line("numeric")
    assert not never_out_of_line("text")
    assert not never_out_of_line("integer[]")


def test_the_key_without_a_primary_key_is_one_unique_index_chosen_by_one_rule() -> None:
    """With no primary key and no configured key, the key is a unique index on NOT NULL
    columns: the index of REPLICA IDENTITY USING INDEX first, else the one with the fewest
    columns, then the first by name. Indexes that cannot hold a key (partial, deferrable,
    invalid, not unique) or have a nullable column never are."""
    columns = [col("a"), col("b"), col("c"), col("n", not_null=False)]
    flawed = [
        index("a_partial", "a", partial=True),
        index("a_deferred", "a", deferrable=True),
        index("a_invalid", "a", valid=False),
        index("a_plain", "a", unique=False),
        index("a_nullable", "n"),
    ]
    assert table("d", columns, flawed).natural_key() is None
    two = index("ab_key", "a", "b")
    later = index("z_c_key", "c")
    earlier = index("y_b_key", "b")
    assert table("d", columns, [*flawed, two, later, earlier]).key_columns() == ("b",)
    assert table("d", columns, [*flawed, two, later]).key_columns() == ("c",)
    named = index("ab_key", "a", "b", identity=True)
    assert table("i", columns, [*flawed, named, later, earlier]).key_columns() == ("a", "b")
    # The primary key wins over every unique index.
    with_pk = table("i", [*columns, col("aid")], [named, earlier, PK])
    assert with_pk.key_columns() == ("aid",)


@pytest.mark.parametrize(
    ("identity", "statement"),
    [
        ("d", 'ALTER TABLE "Odd Shop".accts REPLICA IDENTITY USING INDEX sku_key'),
        ("n", 'ALTER TABLE "Odd Shop".accts REPLICA IDENTITY USING INDEX sku_key'),
    ],
)
def test_a_unique_index_key_the_identity_does_not_send_is_refused_with_its_statement(
    identity: str, statement: str
) -> None:
    """A table keyed by a unique index whose identity is DEFAULT (no primary key) or NOTHING:
    once published the application's UPDATE and DELETE would fail, so logical mode refuses it
    naming the USING INDEX statement for that index; watermark mode needs no identity."""
    columns = [col("sku"), col("note", not_null=False)]
    facts = table(identity, columns, [index("sku_key", "sku")])
    key = facts.key_columns()
    assert key == ("sku",)
    (problem,) = logical_problems(facts, key, configured=False)
    assert "the application's UPDATE and DELETE would fail" in problem
    assert problem.endswith(f"{statement} (or REPLICA IDENTITY FULL)")
    assert watermark_problems(facts, None) == []
    fixed = table("i", columns, [index("sku_key", "sku", identity=True)])
    assert logical_problems(fixed, key, configured=False) == []
    full = table("f", columns, [index("sku_key", "sku")])
    assert logical_problems(full, key, configured=False) == []


def test_a_keyless_table_is_refused_in_one_sentence_with_every_way_forward() -> None:
    """No primary key and no usable unique index: one sentence naming ADD PRIMARY KEY, a new
    unique index with REPLICA IDENTITY USING INDEX, and a configured key with FULL; a unique
    index lacking only NOT NULL is named with the ALTER COLUMN that makes it the key."""
    facts = table("n", [col("a", not_null=False), col("b")], [index("a_key", "a")])
    (problem,) = logical_problems(facts, facts.key_columns(), configured=False)
    assert ". " not in problem
    assert ";" not in problem
    q = '"Odd Shop".accts'
    for fix in (
        f"ALTER TABLE {q} ALTER COLUMN a SET NOT NULL (then unique index a_key is its key)",
        f"ALTER TABLE {q} ADD PRIMARY KEY (...)",
        f"CREATE UNIQUE INDEX CONCURRENTLY accts_cdc_key ON {q} (...) on NOT NULL columns then "
        f"ALTER TABLE {q} REPLICA IDENTITY USING INDEX accts_cdc_key",
        f"[[tables]] key (NOT NULL, with a unique index) and ALTER TABLE {q} REPLICA IDENTITY FULL",
    ):
        assert fix in problem


def test_init_names_each_tables_key_and_what_its_identity_costs() -> None:
    """init's line per table: the key's columns and origin (primary key, unique index by name,
    [[tables]] key) and the identity with its cost; FULL logs whole old rows; watermark mode
    needs no identity."""
    uk = table("i", [col("sku"), col("v")], [index("sku_key", "sku", identity=True)])
    line = identity_line(uk, ("sku",), configured=False, logical=True)
    assert line == (
        "Odd Shop.accts: key (sku) from unique index sku_key; REPLICA IDENTITY USING INDEX "
        "sku_key: an update or delete logs only the old key (the least WAL on the source)"
    )
    full = table("f", COLUMNS, [PK, EMAIL])
    line = identity_line(full, ("email",), configured=True, logical=True)
    assert line.startswith("Odd Shop.accts: key (email) from [[tables]] key; REPLICA IDENTITY FULL")
    assert "every update and delete logs the whole old row" in line
    line = identity_line(table("d", COLUMNS, [PK]), ("aid",), configured=False, logical=False)
    assert line == (
        "Odd Shop.accts: key (aid) from the primary key; watermark mode reads the rows "
        "themselves, so no replica identity is needed"
    )


def test_watermark_mode_accepts_a_keyless_table_and_says_what_the_warehouse_needs() -> None:
    """Watermark mode's objects need no key, so its init accepts a keyless table; its line
    says it has none and names the ways to give it one, without replica identity statements
    (watermark mode needs none)."""
    facts = table("d", [col("a"), col("b", not_null=False)], [index("b_key", "b")])
    assert facts.natural_key() is None
    assert watermark_problems(facts, None) == []
    line = identity_line(facts, (), configured=False, logical=False)
    assert line.startswith("Odd Shop.accts: no key: it has no primary key and no unique index")
    assert 'ALTER TABLE "Odd Shop".accts ALTER COLUMN b SET NOT NULL' in line
    assert "REPLICA IDENTITY" not in line
