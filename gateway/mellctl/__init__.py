"""mellctl: the admin CLI. One module per command group; `main` wires them together."""
