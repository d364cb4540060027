"""Exceptions raised by mnv1_backbone.

Every reader raises one of these (all are `ValueError` subclasses, so callers that only know
`ValueError` still catch them) with a message that names the file and the entry at fault.
"""


class WeightsFormatError(ValueError):
    """A weights file is corrupt, truncated, of an unsupported format, or holds unexpected tensors."""


class StateDictMismatchError(WeightsFormatError):
    """Tensors are missing, unexpected or of the wrong shape for the model being loaded."""
