-- The database and schema that hold the landing table and the final tables.
CREATE DATABASE IF NOT EXISTS {{ database }};
CREATE SCHEMA IF NOT EXISTS {{ database }}.{{ schema }};
USE SCHEMA {{ database }}.{{ schema }};
