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
        super().__init__(f"{param}: {problem}")
        self.param, self.problem = param, problem
