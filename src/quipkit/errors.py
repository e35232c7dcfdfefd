"""The one exception type users see: a problem they can fix, stated with the fix."""


class QuipkitError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""


def missing_dependency(package: str, purpose: str) -> QuipkitError:
    """The error for an optional dependency that is not installed."""
    return QuipkitError(f"{purpose} needs the optional package '{package}': pip install {package}")
