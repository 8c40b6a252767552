"""mailflow: hold public institutions to account by email."""
__version__ = "0.1.0"
