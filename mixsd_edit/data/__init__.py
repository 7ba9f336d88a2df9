"""Data layer: edit requests and dataset loaders (imports nothing else from the package)."""
from mixsd_edit.data.requests import (RequestError, normalize_requests, requests_from_keywords,
                                      validate_request)

__all__ = ["RequestError", "normalize_requests", "requests_from_keywords", "validate_request"]
