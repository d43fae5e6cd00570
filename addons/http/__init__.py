"""Built-in http addon."""
