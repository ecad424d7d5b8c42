"""Every error hubmerge raises on purpose.

A `HubmergeError` carries one line that names the problem and where it is (a config key, a file,
a layer). The CLI prints that line and exits with code 2; anything else is a bug.
"""

from __future__ import annotations


class HubmergeError(Exception):
    """Bad input or an unusable source: the message is shown to the user as is."""


class ConfigError(HubmergeError):
    """The merge configuration is invalid (YAML syntax, unknown key, bad value)."""


class SourceError(HubmergeError):
    """A model cannot be used: missing, corrupt, unsupported or incompatible with the others."""


class OutputError(HubmergeError):
    """The output location cannot be written as asked (it exists, or is not a directory)."""


class HubError(HubmergeError):
    """Publishing failed: offline, not logged in, no access, or the Hub kept failing."""


class TokenError(HubError):
    """The Hub refused the token (401): a page says how to sign in again, the CLI how to log in."""


class CardError(HubmergeError):
    """A model card cannot be rendered: a missing merge file, a bad template or results file."""


class BudgetError(HubmergeError):
    """A job on a shared Space went over the time or memory each job is given."""


class EvalError(HubmergeError):
    """An evaluation cannot run: lm-eval missing, an unknown task, or no model in the folder."""


def quoted(text: object, limit: int = 80) -> str:
    """An untrusted name (a tensor, a file, a config value) as an error message may show it.

    `repr` escapes control characters and line breaks, so the message stays one line and cannot
    be made to look like something else; long names are cut, so a message never carries a file's
    contents.
    """
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 4] + "...'"
