"""cdc-daemon: change-data-capture from PostgreSQL to Snowflake through S3."""

from importlib.metadata import version

# The one place for the version is pyproject.toml; the installed metadata carries it.
__version__ = version("cdc-daemon")
