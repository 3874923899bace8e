"""Results: append-only Parquet shards (shards), the DuckDB catalog over them (catalog) and the read-only SQL command
line (sqlcli)."""
