"""
Moderation of model output (and optionally input) through a pluggable backend.

The relay builds one L{Moderation} from the settings, asks it for a L{Plan}
per request, and moderates the reply through the plan: a whole body with
L{Plan.moderate_body}, a stream with a L{StreamModerator}.
"""

from openai_proxy.moderation.config import ModerationConfig
from openai_proxy.moderation.errors import RequestRefused
from openai_proxy.moderation.policy import Verdict
from openai_proxy.moderation.service import Moderation, Plan
from openai_proxy.moderation.stream import StreamModerator

__all__ = [
    "Moderation",
    "ModerationConfig",
    "Plan",
    "RequestRefused",
    "StreamModerator",
    "Verdict",
]
