"""The errors a user fixes: a config key, a data file, a model folder, a corrupt result, a number
that overflowed, a tracking store. Each names what, where (key, file, row) and the fix; the job
runner prints them as one line (tdabench.pipeline.common), while anything else keeps its
traceback, as a bug should."""


class StudyError(Exception):
    """Base of the typed errors the stage boundary prints as one line."""


class ModelError(StudyError, ValueError):
    """A model that cannot be loaded or used: names its path and what to do."""
