"""The one exception type users see: a message that names the problem and the fix."""


class KVSurgeryError(Exception):
    """Bad input or an unusable model/checkpoint. The CLI prints the message without a traceback."""
