"""The root of labkit's user-facing errors.

Every error that a user can fix (a config key, a file, a dataset folder, a run folder, a network that cannot
be integerized, a training run that diverged) derives from :class:`LabkitError`; its message names the
offending key, file or layer and the fix, and the CLI prints it as one line with exit status 2 (``--debug``
shows the traceback). Each family is its own subclass, defined where the problem is found
(``ConfigError`` in :mod:`labkit.config.schema`, ``CheckpointError`` in :mod:`labkit.train.checkpoint`, ...).
"""


class LabkitError(Exception):
    """A problem the user can fix; the message says what and how (one line)."""


class CheckpointError(LabkitError, ValueError):
    """A checkpoint that cannot be read or used; the message names the file and the fix."""


class ConfigError(LabkitError, ValueError):
    """A configuration problem; ``key_path`` names where it is (``training.gd.opt.class``)."""

    def __init__(self, key_path: str, problem: str, fix: str = ""):
        self.key_path = key_path
        message = f"config key '{key_path}': {problem}" if key_path else problem
        super().__init__(f"{message}. {fix}".rstrip(". ") + ("." if fix else ""))
