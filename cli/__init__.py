"""The `cosmos-edge` command line."""
