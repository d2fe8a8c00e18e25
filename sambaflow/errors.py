"""One exception hierarchy for everything sambaflow raises on purpose.

Every message says what went wrong, where (tensor, argument, file or model line) and how to fix it.
"""


class SambaError(Exception):
    """Base class of every error sambaflow raises on purpose."""


class SambaTraceError(SambaError):
    """The model, inputs or optimizer could not be traced into a static graph."""


class SambaRunError(SambaError):
    """`session.run` (or another runtime call) was given input the compiled graph cannot take."""


class SambaOptimizerError(SambaError):
    """An optimizer was built or loaded with arguments it cannot use."""


class SambaPefError(SambaError):
    """A PEF file is missing, damaged, from another format version, or does not match the app."""


class SambaArgumentError(SambaError):
    """A command-line or driver argument is missing or invalid."""


class SambaBackendError(SambaError):
    """A backend could not compile or run a section graph."""


class SambaIOError(SambaError):
    """A file sambaflow or an app writes or reads could not be: full disk, read-only folder, a
    folder where a file belongs, a missing or damaged checkpoint."""
