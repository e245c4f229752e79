"""The one error type the project raises for bad input.

Every message is a single sentence that names the offending thing (a path, a
tensor, a recipe field), so that front ends can print it as it is.
"""


class TaskVecError(Exception):
    """Bad input or an impossible request; the message is one line for the user."""


class TaskVecWarning(UserWarning):
    """Something the user should know that does not stop the work (one line, like errors), e.g. an all-zero task vector."""


class ParameterError(TaskVecError):
    """A bad value of a named parameter of a library function (``rank``, ``energy``).

    The message reads ``"rank: 0 must be a positive whole number"``; a front end may name the
    parameter its own way (the CLI prints the option, ``--rank``).
    """

    def __init__(self, param: str, problem: str):
        self.param, self.problem = param, problem
        super().__init__(self.worded(param))

    def worded(self, name: str) -> str:
        """The message with the parameter called ``name`` (the CLI passes its option, ``--rank``)."""
        return f"{name}: {self.problem}"


class OutputExistsError(ParameterError):
    """An output path that exists, written without ``overwrite``.

    The message says how to replace it in the caller's words: ``overwrite=True`` for the
    Python API; the CLI names its option (``--overwrite``).
    """

    def __init__(self, path):
        self.path = path
        self.param, self.problem = "overwrite", "output already exists"
        TaskVecError.__init__(self, self.worded("overwrite=True"))

    def worded(self, name: str) -> str:
        return f"{self.path}: output already exists (pass {name} to replace it)"
