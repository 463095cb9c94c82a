"""Errors a user can cause (bad option, file or config). The CLI prints them as one line, without a traceback."""


class UserError(ValueError):
    """Base for mistakes in what the user passed; the message names the file/option and says what to do."""
