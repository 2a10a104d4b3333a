"""Moderation settings (see the README's "Moderation" section)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from openai_proxy.settings import (
    ConfigError,
    parse_bool,
    parse_choice,
    parse_positive,
    read_secret_file,
)

DEFAULT_REFUSAL = "这个话题不适合讨论，换个话题吧。"

#: (option, env, default, doc) for each moderation setting, for the
#: options of L{openai_proxy.tap.Options}.
MODERATION_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    (
        "moderation",
        "MODERATION",
        "request",
        "When to moderate: off, request or always.",
    ),
    (
        "moderation-level",
        "MODERATION_LEVEL",
        "low",
        "low (stop Block) or high (stop all but Pass).",
    ),
    (
        "moderation-backend",
        "MODERATION_BACKEND",
        "tencent when TENCENT_CLOUD_SID/SKEY are set, else none",
        "tencent, openai or keywords.",
    ),
    (
        "moderation-keywords-file",
        "MODERATION_KEYWORDS_FILE",
        "none",
        "Terms for the keywords backend, one per line.",
    ),
    (
        "moderation-on-error",
        "MODERATION_ON_ERROR",
        "block",
        "What a failed moderation call counts as: block or pass.",
    ),
    (
        "moderation-threads",
        "MODERATION_THREADS",
        "10",
        "Threads for the blocking Tencent SDK.",
    ),
    (
        "moderation-timeout",
        "MODERATION_TIMEOUT",
        "5000",
        "Milliseconds for one moderation call.",
    ),
    (
        "refusal-text",
        "REFUSAL_TEXT",
        DEFAULT_REFUSAL,
        "Text that replaces blocked output.",
    ),
    (
        "moderation-max-calls",
        "MODERATION_MAX_CALLS",
        "3000",
        "Backend calls allowed for one reply.",
    ),
    (
        "moderation-max-event-calls",
        "MODERATION_MAX_EVENT_CALLS",
        "20",
        "Backend calls allowed for one SSE event.",
    ),
    ("moderate-input", "MODERATE_INPUT", "off", "on: check the request's input too."),
    ("tencent-cloud-ap", "TENCENT_CLOUD_AP", "ap-singapore", "TMS region."),
    (
        "tencent-cloud-endpoint",
        "TENCENT_CLOUD_ENDPOINT",
        "tms.tencentcloudapi.com",
        "TMS host, or host:port.",
    ),
    ("tencent-cloud-biztype", "TENCENT_CLOUD_BIZTYPE", "none", "TMS BizType."),
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
    max_calls: int = 3000
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
        sid = source("", "TENCENT_CLOUD_SID") or None
        skey = source("", "TENCENT_CLOUD_SKEY") or None
        # One without the other is a typo, not a choice: starting without
        # the moderation it was meant to enable would be silent.
        for given, missing, value in (
            ("TENCENT_CLOUD_SID", "TENCENT_CLOUD_SKEY", skey),
            ("TENCENT_CLOUD_SKEY", "TENCENT_CLOUD_SID", sid),
        ):
            if (sid or skey) and not value:
                raise ConfigError(
                    missing,
                    f"{given} is set but {missing} is not; set both, or neither",
                )
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
