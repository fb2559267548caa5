"""The one exception type for bad user input.

Every message is a single sentence that names what is wrong (key, file, value) and how to fix it.
Command-line entry points catch it, print the sentence without a traceback and exit with code 2.
"""


class MptlikeError(ValueError):
    """A user-facing error: bad config value, missing or corrupt file, unsupported option."""


EXIT_USAGE = 2  # bad input: a config key, a file, a value (one line on stderr)
EXIT_PREEMPTED = 3  # stopped by SIGTERM, SIGUSR1 or SIGINT after writing a complete checkpoint
EXIT_INTERRUPTED = 130  # a signal (or Ctrl-C) before training started: nothing to checkpoint yet


def short_error(exc: BaseException) -> str:
    """A library exception squeezed onto one line, to quote inside a MptlikeError sentence."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
