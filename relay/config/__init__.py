"""Configuration: the model every stage reads, and the YAML parser that builds it."""

from relay.config.auth import (
    ApiKey,
    ApiSettings,
    AuthSettings,
    OAuthClient,
    OAuthSettings,
    RateLimitSettings,
    SignatureSettings,
)
from relay.config.model import (
    ApnsApp,
    App,
    Config,
    Delivery,
    DeliverySettings,
    FcmApp,
    Listen,
    LoggingSettings,
    MetricsSettings,
    Platform,
    Policy,
    StoreSettings,
    WebhookSettings,
)
from relay.config.parse import load_config, parse_config

__all__ = [
    "ApiKey",
    "ApiSettings",
    "ApnsApp",
    "App",
    "AuthSettings",
    "Config",
    "Delivery",
    "DeliverySettings",
    "FcmApp",
    "Listen",
    "LoggingSettings",
    "MetricsSettings",
    "OAuthClient",
    "OAuthSettings",
    "Platform",
    "Policy",
    "RateLimitSettings",
    "SignatureSettings",
    "StoreSettings",
    "WebhookSettings",
    "load_config",
    "parse_config",
]
