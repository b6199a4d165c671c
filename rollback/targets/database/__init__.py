"""The database target: PostgreSQL migrations with verified backups, schema rollback with data restore, PITR."""
