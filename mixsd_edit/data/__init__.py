"""Data layer: edit requests and dataset loaders (imports nothing else from the package)."""
from mixsd_edit.data.loaders import DatasetError, load_requests, load_sample, sample_path
from mixsd_edit.data.requests import (RequestError, normalize_requests, requests_from_keywords,
                                      validate_request)

__all__ = ["DatasetError", "RequestError", "load_requests", "load_sample", "normalize_requests",
           "requests_from_keywords", "sample_path", "validate_request"]
