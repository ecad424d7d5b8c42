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


class CardError(HubmergeError):
    """A model card cannot be rendered: a missing merge file, a bad template or results file."""


class EvalError(HubmergeError):
    """An evaluation cannot run: lm-eval missing, an unknown task, or no model in the folder."""
