"""Moderation settings (see the README's "Moderation" section)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

DEFAULT_REFUSAL = "这个话题不适合讨论，换个话题吧。"

#: (option, env, doc) for each moderation setting, for L{openai_proxy.tap.Options}.
MODERATION_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("moderation", "MODERATION", "off | request (default) | always"),
    ("moderation-level", "MODERATION_LEVEL", "low (default: stop Block) | high"),
    ("moderation-backend", "MODERATION_BACKEND", "tencent | openai | keywords"),
    ("moderation-keywords-file", "MODERATION_KEYWORDS_FILE", "keywords file"),
    ("moderation-on-error", "MODERATION_ON_ERROR", "block (default) | pass"),
    ("moderation-threads", "MODERATION_THREADS", "threads for blocking backends (10)"),
    ("moderation-timeout", "MODERATION_TIMEOUT", "ms for one moderation call (5000)"),
    ("refusal-text", "REFUSAL_TEXT", "text that replaces blocked output"),
    (
        "moderation-max-calls",
        "MODERATION_MAX_CALLS",
        "backend calls allowed per response (1000)",
    ),
    (
        "moderation-max-event-calls",
        "MODERATION_MAX_EVENT_CALLS",
        "backend calls allowed per streamed event (20)",
    ),
    ("moderate-input", "MODERATE_INPUT", "on | off (default)"),
    ("tencent-cloud-ap", "TENCENT_CLOUD_AP", "TMS region (ap-singapore)"),
    ("tencent-cloud-endpoint", "TENCENT_CLOUD_ENDPOINT", "TMS host[:port]"),
    ("tencent-cloud-biztype", "TENCENT_CLOUD_BIZTYPE", "TMS BizType"),
)


@dataclass(frozen=True)
class ModerationConfig:
    """Validated moderation settings; C{backend} is L{None} when none is configured."""

    mode: str = "request"
    level: str = "low"
    backend: str | None = None
    keywords_file: str | None = None
    on_error: str = "block"
    threads: int = 10
    timeout: float = 5.0
    refusal_text: str = DEFAULT_REFUSAL
    max_calls: int = 1000
    max_event_calls: int = 20
    moderate_input: bool = False
    tencent_secret_id: str | None = field(default=None, repr=False)
    tencent_secret_key: str | None = field(default=None, repr=False)
    tencent_region: str = "ap-singapore"
    tencent_endpoint: str = "tms.tencentcloudapi.com"
    tencent_biztype: str | None = None

    @classmethod
    def load(cls, source: Callable[[str, str], str | None]) -> ModerationConfig:
        """Parse the moderation settings; raise C{ConfigError} naming a bad one."""
        from openai_proxy.config import (
            ConfigError,
            parse_bool,
            parse_choice,
            parse_positive,
            read_secret_file,
        )

        sid = source("", "TENCENT_CLOUD_SID") or None
        skey = source("", "TENCENT_CLOUD_SKEY") or None
        backend_raw = source("moderation-backend", "MODERATION_BACKEND")
        default_backend = "tencent" if sid and skey else ""
        backend = (
            parse_choice(
                "MODERATION_BACKEND",
                backend_raw,
                ("tencent", "openai", "keywords"),
                default_backend,
            )
            or None
        )
        keywords_file = (
            source("moderation-keywords-file", "MODERATION_KEYWORDS_FILE") or None
        )
        if backend == "tencent" and not (sid and skey):
            raise ConfigError(
                "MODERATION_BACKEND",
                "tencent needs TENCENT_CLOUD_SID and TENCENT_CLOUD_SKEY",
            )
        if backend == "keywords" and not keywords_file:
            raise ConfigError(
                "MODERATION_KEYWORDS_FILE", "the keywords backend needs this file"
            )
        if backend == "keywords" and keywords_file:
            read_secret_file("MODERATION_KEYWORDS_FILE", keywords_file)
        mode = parse_choice(
            "MODERATION",
            source("moderation", "MODERATION"),
            ("off", "request", "always"),
            "request",
        )
        moderate_input = parse_bool(
            "MODERATE_INPUT", source("moderate-input", "MODERATE_INPUT"), False
        )
        # Settings that promise a check must not start without a way to check.
        for setting, promised in (
            ("MODERATION", mode == "always"),
            ("MODERATE_INPUT", moderate_input and mode != "off"),
        ):
            if promised and backend is None:
                raise ConfigError(
                    setting,
                    "needs a moderation backend: set TENCENT_CLOUD_SID and "
                    "TENCENT_CLOUD_SKEY, or MODERATION_BACKEND",
                )
        return cls(
            mode=mode,
            level=parse_choice(
                "MODERATION_LEVEL",
                source("moderation-level", "MODERATION_LEVEL"),
                ("low", "high"),
                "low",
            ),
            backend=backend,
            keywords_file=keywords_file,
            on_error=parse_choice(
                "MODERATION_ON_ERROR",
                source("moderation-on-error", "MODERATION_ON_ERROR"),
                ("block", "pass"),
                "block",
            ),
            threads=int(
                parse_positive(
                    "MODERATION_THREADS",
                    source("moderation-threads", "MODERATION_THREADS"),
                    10,
                    integer=True,
                )
            ),
            timeout=parse_positive(
                "MODERATION_TIMEOUT",
                source("moderation-timeout", "MODERATION_TIMEOUT"),
                5000,
            )
            / 1000.0,
            refusal_text=source("refusal-text", "REFUSAL_TEXT") or DEFAULT_REFUSAL,
            max_calls=int(
                parse_positive(
                    "MODERATION_MAX_CALLS",
                    source("moderation-max-calls", "MODERATION_MAX_CALLS"),
                    cls.max_calls,
                    integer=True,
                )
            ),
            max_event_calls=int(
                parse_positive(
                    "MODERATION_MAX_EVENT_CALLS",
                    source("moderation-max-event-calls", "MODERATION_MAX_EVENT_CALLS"),
                    cls.max_event_calls,
                    integer=True,
                )
            ),
            moderate_input=moderate_input,
            tencent_secret_id=sid,
            tencent_secret_key=skey,
            tencent_region=source("tencent-cloud-ap", "TENCENT_CLOUD_AP")
            or "ap-singapore",
            tencent_endpoint=source("tencent-cloud-endpoint", "TENCENT_CLOUD_ENDPOINT")
            or "tms.tencentcloudapi.com",
            tencent_biztype=source("tencent-cloud-biztype", "TENCENT_CLOUD_BIZTYPE")
            or None,
        )
