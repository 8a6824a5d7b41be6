"""Errors the build reports to its user as one line and a non-zero exit."""


class BuildError(Exception):
    """A problem the user can fix: bad recipe, missing source, unwritable store, failed gate."""


class RecipeError(BuildError):
    pass


class SourceError(BuildError):
    pass


class StoreError(BuildError):
    pass
