"""Generated wire stubs (see proto/generate.py)."""
