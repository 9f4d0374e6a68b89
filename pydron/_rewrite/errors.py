"""The one exception of the rewrite."""


class RewriteError(Exception):
    """The rewriter met code it cannot handle soundly; the caller runs the function plainly."""
