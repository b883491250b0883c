"""The `mergetune` command line: thin commands over the subpackages."""
