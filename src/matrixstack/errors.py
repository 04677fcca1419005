"""Errors a user can cause. The CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """A mistake in user input (a file, a name, an option), with a message that says how to fix it."""


class SpecError(UserError):
    """A spec file (fabric, arch, shape) that cannot be read or does not validate."""


class UnknownNameError(UserError):
    """A built-in name that does not exist; the message lists the known names."""
