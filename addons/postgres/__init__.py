"""Built-in postgres addon."""
