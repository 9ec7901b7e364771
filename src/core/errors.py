"""User-facing errors.

Every error a user can cause (a bad config key, a malformed data line, a missing or
corrupt checkpoint, a model that is not trained yet) is a ``MarkError``. Command-line
entry points print its message as one line and exit with code 2, no traceback.
"""


class MarkError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(MarkError):
    """A config file, key, type or value is wrong."""


class DataError(MarkError):
    """A data file is missing or malformed (the message names the file and line)."""


class CheckpointError(MarkError):
    """A checkpoint is missing, corrupt, truncated or belongs to another model."""


class NotTrainedError(MarkError):
    """A model was asked for that has not been trained; the message names the command."""


class UnreadableFileError(DataError):
    """A source file that cannot be read as documents: ``"<path>: <reason>"``, one line.

    Raised for binary content under a text extension, a broken PDF, a file with no
    text, bad encoding or a malformed line (the reason names the line). Ingestion skips
    such a file and counts it (``--strict`` makes it fatal).
    """

    def __init__(self, path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # picklable (Ray workers send it back to the driver)
        return (type(self), (self.path, self.reason))


class TrainingStopped(MarkError):
    """A run stopped on request (SIGTERM) after saving a resumable checkpoint; exit code 143
    (128 + SIGTERM), so a caller tells a requested stop from a failure."""

    exit_code = 143
