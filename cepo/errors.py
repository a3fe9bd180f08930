"""Errors in what the user gave (an option, a config file, a data set, a model name).

Each message names what is wrong and what to pass instead; the command-line entry points print
``<label>: <message>`` as one line and exit, instead of a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user, as opposed to a bug: shown as one line, never a traceback."""

    label = "error"


class ConfigError(UserError, ValueError):
    """A bad key or value: the message names the key, the value and what is allowed."""

    label = "config error"


class DataError(UserError, ValueError):
    """A data file that cannot be read as rows: the message names the file and the line."""

    label = "data error"


class NotAvailable(UserError, FileNotFoundError):
    """A data set or model that is neither local nor reachable: says what to pass instead."""

    label = "not available"
