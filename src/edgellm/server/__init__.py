"""The HTTP server: OpenAI-compatible routes over one AsyncEngine per model."""

from edgellm.server.app import create_app
from edgellm.server.models import ServedModel

__all__ = ["ServedModel", "create_app"]
