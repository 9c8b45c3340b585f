"""Test package (makes test modules `tests.<subpkg>.<name>`, so a test
directory such as tests/tokenizers never shadows a real package)."""
