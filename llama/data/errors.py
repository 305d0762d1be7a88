"""The one exception type of the data pipeline: bad input, with what is wrong and where (file, line, limit)."""


class DataError(ValueError):
    """Input data that cannot be used as it is; the message names the file (and line) and the rule broken."""
