"""How `snowflake apply --plan` reads definitions (pure): a rendered statement's properties, the
values Snowflake's DESC and SHOW give in their own forms, and what counts as a difference."""

from __future__ import annotations

from cdc_daemon.warehouse import sql
from cdc_daemon.warehouse.plan import _same_type, desired, differences, norm
from tests.helpers import seed_settings
from tests.schemas import sales_tables


def _rendered() -> list[sql.Statement]:
    settings = seed_settings(s3={"bucket": "acme-cdc", "prefix": "raw/"})
    return sql.statements(settings, sales_tables(settings))


def test_desc_forms_of_a_value_equal_the_rendered_ones() -> None:
    """DESC shows a URL as a JSON list, an empty NULL_IF as [], a quote as \\", and its own
    case: each compares equal to the rendered value; other values do not."""
    assert norm('["s3://acme-cdc/raw/"]') == norm("'s3://acme-cdc/raw/'")
    assert norm("[]") == norm("()")
    assert norm('\\"') == norm("'\"'")
    assert norm("true") == norm("TRUE")
    assert norm("1") != norm("0")


def test_the_rendered_file_format_against_its_desc_output_differs_in_nothing() -> None:
    """The rendered file format against DESC FILE FORMAT's rows for the same format (values in
    DESC's forms, defaults flagged): no difference. The positional loads' format (SKIP_HEADER
    = 1, PARSE_HEADER false) differs in both, each named."""
    fmt = next(s for s in _rendered() if s.head.startswith("CREATE OR ALTER FILE"))
    found = desired(fmt)
    assert found is not None
    kind, name, want = found
    assert (kind, name) == ("FILE FORMAT", "CDC_CSV")
    desc = {
        "TYPE": ("CSV", False),
        "FIELD_DELIMITER": (",", True),
        "PARSE_HEADER": ("true", False),
        "ERROR_ON_COLUMN_COUNT_MISMATCH": ("false", False),
        "FIELD_OPTIONALLY_ENCLOSED_BY": ('\\"', False),
        "ESCAPE_UNENCLOSED_FIELD": ("NONE", False),
        "NULL_IF": ("[]", False),
        "EMPTY_FIELD_AS_NULL": ("true", True),
        "COMPRESSION": ("AUTO", True),
        "SKIP_HEADER": ("0", True),
        "TRIM_SPACE": ("false", True),
    }
    assert differences(kind, want, desc) == []
    old = {**desc, "PARSE_HEADER": ("false", True), "SKIP_HEADER": ("1", False)}
    assert differences(kind, want, old) == [
        "PARSE_HEADER: false -> TRUE",
        "SKIP_HEADER: 1 -> its default",
    ]


def test_a_task_and_a_pipe_compare_on_their_text_not_its_layout() -> None:
    """SHOW TASKS and SHOW PIPES give the definition as Snowflake keeps it: other line breaks
    and case are no difference; another schedule or another COPY is."""
    statements = _rendered()
    task = next(s for s in statements if s.head.startswith("CREATE OR ALTER TASK"))
    found = desired(task)
    assert found is not None
    kind, _, want = found
    shown = {k: (" ".join(v.split()).lower(), False) for k, v in want.items()}
    assert differences(kind, want, shown) == []
    later = {**shown, "SCHEDULE": ("60 MINUTE", False)}
    assert differences(kind, want, later) == [f"SCHEDULE: 60 MINUTE -> {want['SCHEDULE']}"]
    pipe = next(s for s in statements if s.head.startswith("CREATE PIPE"))
    found = desired(pipe)
    assert found is not None
    kind, _, want = found
    assert differences(kind, want, {"COPY": (want["COPY"].replace("\n", " "), False)}) == []
    other = want["COPY"].replace("CASE_INSENSITIVE", "NONE")
    assert differences(kind, want, {"COPY": (other, False)}) == [
        "COPY: differs from the rendered one"
    ]


def test_a_storage_integration_is_altered_in_place_when_its_location_changed() -> None:
    """The integration as DESC INTEGRATION shows it (a list of locations, true in lower case)
    matches the rendered one; another allowed location is a difference, made with ALTER
    STORAGE INTEGRATION ... SET (which keeps the external ID), never by recreating it."""
    integration = next(s for s in _rendered() if s.head.startswith("CREATE STORAGE"))
    found = desired(integration)
    assert found is not None
    kind, name, want = found
    assert (kind, name) == ("INTEGRATION", "CDC_S3")
    desc = {
        "ENABLED": ("true", False),
        "STORAGE_AWS_ROLE_ARN": (want["STORAGE_AWS_ROLE_ARN"].strip("'"), False),
        "STORAGE_ALLOWED_LOCATIONS": ("s3://acme-cdc/raw/", False),
    }
    assert differences(kind, want, desc) == []
    moved = {**desc, "STORAGE_ALLOWED_LOCATIONS": ("s3://acme-cdc/old/", False)}
    assert differences(kind, want, moved) == [
        "STORAGE_ALLOWED_LOCATIONS: s3://acme-cdc/old/ -> ('s3://acme-cdc/raw/')"
    ]


def test_desc_table_types_with_their_sizes_are_the_rendered_types() -> None:
    """DESC TABLE gives each type its size or precision: those are the same type as the
    rendered one without it; another precision or another type is not."""
    assert _same_type("VARCHAR(16777216)", "VARCHAR")
    assert _same_type("TIMESTAMP_TZ(9)", "TIMESTAMP_TZ")
    assert _same_type("NUMBER(38,0)", "NUMBER(38, 0)")
    assert not _same_type("NUMBER(38,2)", "NUMBER(38, 9)")
    assert not _same_type("VARCHAR(16777216)", "NUMBER(19, 0)")
