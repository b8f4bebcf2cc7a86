"""The table's name as the configuration gives it, resolved once (``Settings.table``)."""

from __future__ import annotations

import pytest

from cdc_daemon.config import default_name, load_settings, qualified_name


@pytest.mark.parametrize(
    ("configured", "resolved"),
    [
        ("ecommerce_sales", "public.ecommerce_sales"),
        ("public.ecommerce_sales", "public.ecommerce_sales"),
        ("Shop.Sales", "shop.sales"),
        ('"Shop"."Sales"', "Shop.Sales"),
        ('shop."odd.name"', "shop.odd.name"),
        ('"say ""hi"""', 'public.say "hi"'),
    ],
)
def test_qualified_name_follows_postgres_identifier_rules(configured: str, resolved: str) -> None:
    """An unqualified name is in ``public``; unquoted parts fold to lower case as PostgreSQL
    folds them, quoted parts keep their case, dots and doubled quotes."""
    assert qualified_name(configured) == resolved


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
