"""Editing methods. Each subpackage registers itself in its ``__init__`` with one call; importing
this package loads the built-in ones, so look methods up through here."""
from mixsd_edit.methods import mixsd  # noqa: F401
from mixsd_edit.methods import ft, sft  # noqa: F401
from mixsd_edit.methods import rome, memit  # noqa: F401
from mixsd_edit.registry import Method, get_method, registered_methods

__all__ = ["Method", "get_method", "registered_methods"]
