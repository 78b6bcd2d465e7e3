"""One module per noun; each is a thin layer over server/services."""
