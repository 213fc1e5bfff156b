"""The one error type users see: bad input, told in one line that names the problem and the fix."""


class InputError(ValueError):
    """Bad user input. The message names parameters as the Python API spells them (``overwrite=True``,
    ``method='solver'``); the command line turns them into its flags and exits with code 2."""
