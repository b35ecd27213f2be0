"""The `edgellm` command line."""
