"""A table's identity (``cdc_daemon.names.TableName``): parsed once by PostgreSQL's rules,
printed back to the same value, and the folder and ledger key derived from it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql

from cdc_daemon.config import default_name, load_settings
from cdc_daemon.errors import ConfigError
from cdc_daemon.names import (
    SNOWFLAKE_PLAIN,
    SNOWFLAKE_RESERVED,
    TableName,
    warehouse_column,
    warehouse_identifier,
)

# Any text PostgreSQL takes as a name: capitals, dots, spaces, quotes, slashes, percent signs,
# non-ASCII letters and reserved words, within its 63 bytes.
_PART = st.one_of(
    st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(["select", "Order", "user", "a.b", 'x"y', "a b", "Ünï", "x/y", "50%"]),
).filter(lambda p: len(p.encode()) <= 63)


@pytest.mark.parametrize(
    ("configured", "schema", "name"),
    [
        ("ecommerce_sales", "public", "ecommerce_sales"),
        ("public.ecommerce_sales", "public", "ecommerce_sales"),
        ("Shop.Sales", "shop", "sales"),
        (' Shop . "Sales" ', "shop", "Sales"),
        ('"Shop"."Sales"', "Shop", "Sales"),
        ('shop."odd.name"', "shop", "odd.name"),
        ('"say ""hi"""', "public", 'say "hi"'),
        ('"Odd.Schema"."Order Lines"', "Odd.Schema", "Order Lines"),
        ("Shop.Order-Lines", "shop", "order-lines"),
        ("ÜBER.x", "Über", "x"),
    ],
)
def test_parse_follows_postgres_identifier_rules(configured: str, schema: str, name: str) -> None:
    """An unqualified name is in ``public``; unquoted parts fold ASCII letters to lower case as
    PostgreSQL folds them, quoted parts keep their case, dots, spaces and doubled quotes."""
    assert TableName.parse(configured) == TableName(schema, name)


@given(_PART, _PART)
def test_display_parses_back_to_the_same_table(schema: str, name: str) -> None:
    """Whatever the parts hold, the printed form parses back to the same value, and the SQL
    identifier quotes the same two parts."""
    table = TableName(schema, name)
    assert TableName.parse(str(table)) == table
    assert TableName.parse(table.display) == table
    assert table.sql() == sql.Identifier(schema, name)


@given(_PART, _PART, _PART, _PART)
def test_two_tables_never_share_a_folder_or_ledger_key(a: str, b: str, c: str, d: str) -> None:
    """The folder and ledger key map back to one table: different tables, different keys,
    and a key is one folder deep (no slash) with exactly one dot."""
    one, two = TableName(a, b), TableName(c, d)
    assert (one.key == two.key) == (one == two)
    assert one.folder == one.key + "/"
    assert "/" not in one.key
    assert one.key.count(".") == 1


@pytest.mark.parametrize(
    ("table", "key"),
    [
        (TableName("public", "ecommerce_sales"), "public.ecommerce_sales"),
        (TableName("Shop", "Order Lines"), "Shop.Order Lines"),
        (TableName("Odd.Schema", "Order Lines"), "Odd%2ESchema.Order Lines"),
        (TableName("s", "a/b"), "s.a%2Fb"),
        (TableName("s", "100%"), "s.100%25"),
    ],
)
def test_folder_is_schema_dot_name_unless_a_part_holds_a_dot_slash_or_percent(
    table: TableName, key: str
) -> None:
    """A plain name's folder and ledger key are ``schema.name`` (what deployed daemons wrote);
    a part holding ``.``, ``/`` or ``%`` is percent-encoded (docs/design.md#object-names)."""
    assert table.key == key
    assert table.folder == key + "/"


def test_display_quotes_only_where_postgres_needs_it() -> None:
    """Lower-case plain parts print bare; capitals, spaces, dots, quotes and reserved words are
    quoted, a quote doubled."""
    assert str(TableName("public", "orders")) == "public.orders"
    assert str(TableName("Odd.Schema", "Order Lines")) == '"Odd.Schema"."Order Lines"'
    assert str(TableName("public", "select")) == 'public."select"'
    assert str(TableName('a"b', "x")) == '"a""b".x'
    assert TableName("Odd.Schema", "Order Lines").qualified == "Odd.Schema.Order Lines"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "is not a table name"),
        ("   ", "is not a table name"),
        ("a.b.c", "two parts at most"),
        ("a.", "is not a table name"),
        (".a", "is not a table name"),
        ('"open', "is not a table name"),
        ('"".x', "empty quoted name"),
        ('a"b".c', "is not a table name"),
        ("x." + "n" * 64, "longer than PostgreSQL's 63 bytes"),
    ],
)
def test_parse_refuses_what_names_no_table(text: str, says: str) -> None:
    """Text that names no table is refused with one sentence saying why."""
    with pytest.raises(ValueError, match=says) as caught:
        TableName.parse(text)
    assert "\n" not in str(caught.value)


def test_configuration_refuses_a_bad_name_in_one_sentence() -> None:
    """A configured name PostgreSQL cannot read stops the configuration with one sentence."""
    with pytest.raises(ConfigError, match="not a table name"):
        load_settings(None, tables=[{"name": "a.b.c"}], capture={"group": "g"})
    with pytest.raises(ConfigError, match="not a table name"):
        load_settings(None, postgres={"table": '"open'})


def test_the_same_table_spelled_twice_is_refused() -> None:
    """Two spellings of one table (``Shop.X`` and ``shop.x``) are one table, listed twice."""
    with pytest.raises(ConfigError, match="listed twice"):
        load_settings(None, tables=[{"name": "Shop.X"}, {"name": "shop.x"}], capture={"group": "g"})


def test_odd_name_settings_derive_every_name_from_the_value() -> None:
    """A quoted name with a dot keeps its parts: the ledger key and folder are the encoded
    form, the warehouse default is the name upper-cased with its space made a ``_``."""
    settings = load_settings(None, postgres={"table": '"Odd.Schema"."Order Lines"'})
    spec = settings.table_specs[0]
    assert spec.table == TableName("Odd.Schema", "Order Lines")
    assert settings.table == spec.qualified == "Odd%2ESchema.Order Lines"
    assert spec.warehouse_name == "ORDER_LINES"
    assert settings.slot_name == "cdc_odd_schema_order_lines"


def test_slot_and_publication_default_to_the_table() -> None:
    """Without names of their own, slot and publication are ``cdc_<schema>_<table>``, made a
    valid slot name; configured names win."""
    settings = load_settings(None, postgres={"table": "Shop.Order-Lines"})
    assert settings.table == "shop.order-lines"
    assert settings.slot_name == settings.publication_name == "cdc_shop_order_lines"
    named = load_settings(
        None, postgres={"table": "t"}, capture={"slot_name": "s1", "publication_name": "p1"}
    )
    assert (named.slot_name, named.publication_name) == ("s1", "p1")
    assert default_name("a" * 40, "b" * 40) == ("cdc_" + "a" * 40 + "_" + "b" * 40)[:63]


@given(_PART, _PART)
def test_a_ledger_key_names_its_table_back(schema: str, name: str) -> None:
    """``from_key`` inverts ``key`` (how ``status`` prints a table as a user writes it), and a
    group's name, which has no dot, names no table."""
    table = TableName(schema, name)
    assert TableName.from_key(table.key) == table
    assert TableName.from_key("shop") is None


@pytest.mark.parametrize(
    ("name", "identifier"),
    [
        ("ecommerce_sales", "ECOMMERCE_SALES"),
        ("OrderLines", "ORDERLINES"),
        ("Order Lines", "ORDER_LINES"),
        ("order-lines.v2", "ORDER_LINES_V2"),
        ('we"ird', "WE_IRD"),
        ("select", "SELECT_"),
        ("2024_orders", "_2024_ORDERS"),
        ("$x", "_$X"),
        ("prix€", "PRIX_"),
        ("Ωmega", "_MEGA"),
        ("straße", "STRASSE"),
        ("pay$", "PAY$"),
    ],
)
def test_default_warehouse_name_follows_the_documented_mapping(name: str, identifier: str) -> None:
    """The default Snowflake name of a source table (docs/design.md#object-names): upper case,
    every character but A-Z, 0-9, _ and $ made ``_``, a ``_`` before a leading digit or ``$``
    and after a reserved word; a name that was already a plain identifier keeps its old
    default (its upper case)."""
    assert warehouse_identifier(name) == identifier
    assert TableName("adv", name).warehouse_default == identifier


@given(_PART)
def test_default_warehouse_name_is_always_a_plain_identifier(name: str) -> None:
    """Whatever PostgreSQL allows as a name, its default Snowflake name is an unquoted
    identifier that is no reserved word, so the objects named after it need no quotes."""
    identifier = warehouse_identifier(name)
    assert SNOWFLAKE_PLAIN.match(identifier)
    assert identifier == identifier.upper()
    assert identifier not in SNOWFLAKE_RESERVED


@pytest.mark.parametrize(
    ("source", "column"),
    [
        ("first name", "FIRST NAME"),
        ('we"ird', 'WE"IRD'),
        ("prix€", "PRIX€"),
        ("Ω", "Ω"),
        ("ω", "Ω"),
        ("straße", "STRASSE"),
        ("é", "É"),
        ("select", "SELECT"),
    ],
)
def test_a_column_keeps_its_exact_text_upper_cased(source: str, column: str) -> None:
    """A column's Snowflake name is its exact text upper-cased as Snowflake's UPPER does it
    (Unicode: ``ß`` -> ``SS``; spaces, quotes and symbols kept), always quoted in the SQL."""
    assert warehouse_column(source) == column
