"""Errors raised by the stages for bad user input.

The ingress maps :class:`InvalidInput` to gRPC ``INVALID_ARGUMENT`` with the
message, which always names the offending request field.
"""


class InvalidInput(ValueError):
    """A request field holds a value the service cannot use.

    Attributes:
        field: the request field's name as in the .proto (e.g. ``"image"``).
    """

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message

    def __reduce__(self):
        # Picklable with its two arguments, so the error crosses process boundaries
        # (Ray Serve deployment -> ingress) as itself.
        return (type(self), (self.field, self.reason))
