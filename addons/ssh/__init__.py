"""Built-in ssh addon."""
