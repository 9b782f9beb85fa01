"""Errors that end a stage with a clear message and a non-zero exit."""


class LeptonError(Exception):
    """Base class: the message is shown to the user as it is, without a traceback."""


class ConfigError(LeptonError):
    """params.yaml (or an override) has an unknown key or a bad value."""


class DataError(LeptonError):
    """An input file is missing, unreadable or breaks the data contract."""

    def __init__(self, file: str, problem: str, field: str | None = None, row: int | None = None):
        where = file
        if field is not None:
            where += f", field '{field}'"
        if row is not None:
            where += f", row {row}"
        super().__init__(f"{where}: {problem}")
        self.file, self.field, self.row, self.problem = file, field, row, problem


class GateError(LeptonError):
    """A pipeline gate refused to go on (for example a privacy or quality budget)."""
