"""The error of a request the domain will not act on; its own module, so every other one may raise it."""


class InvalidRequest(ValueError):
    """The request cannot be acted on (unknown order, bad id, empty reason...). Nothing was changed."""
