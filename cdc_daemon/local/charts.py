"""The sample's charts for the demo's report: what a BI dashboard on the sample's models
(``INVOICES`` and ``PRODUCTS`` on ``SALES``, ``snowflake/models/SALES``) shows. Prices in the
UCI Online Retail data are in pounds sterling (a UK retailer)."""

from __future__ import annotations

from typing import Any

from cdc_daemon.warehouse.report import Query, chart


def sample_charts(query: Query) -> list[Any]:
    """Revenue by country, top products, invoices and cancellations per month."""
    countries = query(
        "SELECT COUNTRY, SUM(AMOUNT)::NUMBER(38, 2) AS REVENUE FROM INVOICES"
        " GROUP BY COUNTRY ORDER BY REVENUE DESC LIMIT 12"
    )
    by_country = chart(
        "HorizontalBar",
        "Revenue by country, top 12 (GBP, from INVOICES)",
        x_title="revenue (GBP)",
        show_legend=False,
        truncate_label=-1,
    )
    by_country.x_labels = [str(r["COUNTRY"]) for r in reversed(countries)]
    by_country.add("revenue (GBP)", [float(r["REVENUE"] or 0) for r in reversed(countries)])

    products = query(
        "SELECT STOCK_CODE, DESCRIPTION, QUANTITY FROM PRODUCTS ORDER BY QUANTITY DESC LIMIT 10"
    )
    top = chart(
        "HorizontalBar",
        "Top 10 products by quantity sold (from PRODUCTS)",
        x_title="units",
        show_legend=False,
        truncate_label=-1,
        margin_left=10,
    )
    top.x_labels = [
        f"{r['STOCK_CODE']} {r['DESCRIPTION'] or ''}".strip() for r in reversed(products)
    ]
    top.add("units", [int(r["QUANTITY"]) for r in reversed(products)])

    months = query(
        "SELECT DATE_TRUNC('MONTH', INVOICE_DATE) AS MONTH, COUNT(*) AS INVOICES,"
        " SUM(CASE WHEN IS_CANCELLATION THEN 1 ELSE 0 END) AS CANCELLED"
        " FROM INVOICES GROUP BY 1 ORDER BY 1"
    )
    # The data set spans 2010-12 to 2011-12; the demo's live inserts are dated today, so a
    # month of today (if any) is shown apart, not as the month after 2011-12.
    cancellations = chart(
        "Bar",
        "Invoices and cancellations per month (from INVOICES; the last bar, if later than "
        "2011-12, is the demo's live inserts)",
        y_title="count",
        x_label_rotation=30,
        include_x_axis=True,
    )
    cancellations.x_labels = [str(r["MONTH"])[:7] for r in months]
    cancellations.add("invoices", [int(r["INVOICES"]) for r in months])
    cancellations.add("cancellations", [int(r["CANCELLED"]) for r in months])
    return [by_country, top, cancellations]
