"""Errors meant for the user: each message names the problem and how to fix it."""


class LayoutRetouchError(ValueError):
    """Bad input or set-up; the CLI prints the message without a traceback."""


class ModelLoadError(LayoutRetouchError):
    """A model path, checkpoint or embedding could not be used."""


class PromptError(LayoutRetouchError):
    """A prompt cannot be used with the personal token and class word given."""


class ImageInputError(LayoutRetouchError):
    """An input image is missing, unreadable or empty."""
