"""cdc-daemon: change-data-capture from PostgreSQL to Snowflake through S3."""

__version__ = "0.1.0"
