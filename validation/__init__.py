"""Data validation with great-expectations: suites for train and eval records."""

from validation.suites import (
    Failure,
    ValidationReport,
    validate_file,
    validate_frame,
    validate_mixture,
)

__all__ = ["Failure", "ValidationReport", "validate_file", "validate_frame", "validate_mixture"]
