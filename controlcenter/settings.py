"""One env-driven settings file with safe defaults: a fresh checkout runs on SQLite and the
in-memory channel layer; production sets DATABASE_URL and REDIS_URL."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from controlcenter.secretkey import make_private_dir, make_private_file

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name: str, default: str) -> bool:
    value = os.getenv(name, default)
    if value not in ("True", "False"):
        raise ImproperlyConfigured(f"{name} must be True or False, not {value!r}")
    return value == "True"


def envint(name: str, default: int) -> int:
    value = os.getenv(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be a whole number, not {value!r}"
        ) from None


def envfloat(name: str, default: float) -> float:
    value = os.getenv(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from None


def envsecret(name: str, default: str = "") -> str:
    """Read NAME, or the file named by NAME_FILE (Docker secrets)."""
    path = os.getenv(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.getenv(name, default)


DATA_DIR = Path(os.getenv("CONTROLCENTER_DATA_DIR", BASE_DIR / "data"))

DEBUG = envbool("DJANGO_DEBUG", "False")
SECRET_KEY = envsecret("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    # A fresh checkout gets a random key kept in the data folder, never one in the code.
    from controlcenter.secretkey import load_or_create_secret_key

    SECRET_KEY = load_or_create_secret_key(DATA_DIR / "secret_key")

ALLOWED_HOSTS = [
    h
    for h in os.getenv("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",")
    if h
]
CSRF_TRUSTED_ORIGINS = [
    o for o in os.getenv("CSRF_TRUSTED_ORIGINS", "").split(",") if o
]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "django_htmx",
    "template_partials",
    "fleet",
    "chat",
    "alerts",
    "approvals",
    "cron",
    "usage",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "controlcenter.csp.ContentSecurityPolicyMiddleware",
    # Who made an account change, for its audit event (fleet/audit.py).
    "fleet.audit.request_middleware",
]

ROOT_URLCONF = "controlcenter.urls"
ASGI_APPLICATION = "controlcenter.asgi.application"
WSGI_APPLICATION = None

TEMPLATES: list[dict[str, Any]] = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "fleet.context_processors.roles",
            ],
        },
    },
]

make_private_dir(DATA_DIR)  # 0700: the SQLite database holds device keys and tokens
DATABASES = {
    "default": dj_database_url.parse(
        os.getenv("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'controlcenter.sqlite3'}",
        # Async consumers and the worker share threads: persistent connections would leak.
        conn_max_age=0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if str(DATABASES["default"]["NAME"]) not in ("", ":memory:"):
        # 0600, made before SQLite makes it: it holds device keys and tokens.
        make_private_file(Path(DATABASES["default"]["NAME"]))
    # WAL lets the web read while the worker writes; IMMEDIATE avoids lock upgrades failing.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # Tests run views and the worker in threads at once. The default shared-cache memory
    # test database fails at once on table locks ("database table is locked"); a file (one
    # per test process, so parallel runs do not collide) gets WAL and the busy timeout.
    # (In the temp folder: Django removes the file afterwards, but not its -wal/-shm.)
    DATABASES["default"]["TEST"] = {
        "NAME": str(
            Path(tempfile.gettempdir()) / f"controlcenter-test-{os.getpid()}.sqlite3"
        )
    }
else:
    DATABASES["default"].setdefault("OPTIONS", {})["application_name"] = os.getenv(
        "DB_APPLICATION_NAME", "controlcenter"
    )
    # A pool (psycopg_pool, Django's "pool" option) instead of a new connection per
    # request or ORM step: conn_max_age=0 above hands each connection back to it. A new
    # PostgreSQL connection is 3-5 ms, a sixth of the fleet page through daphne. One stays
    # open per process when idle; the cap is above the threads that use the ORM at once
    # (daphne's and the worker's executors), so nothing waits for a connection.
    DATABASES["default"]["OPTIONS"]["pool"] = {
        "min_size": 1,
        "max_size": 20,
        "max_idle": 300,
        "timeout": 20,
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.getenv("REDIS_URL", "")
CHANNEL_LAYER_PREFIX = os.getenv("CHANNEL_LAYER_PREFIX", "controlcenter")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 times reads out after 5 s by default, exactly as long as
                # channels_redis blocks waiting for a message (BZPOPMIN, 5 s): every socket
                # and the worker's command channel died with TimeoutError after 5 quiet
                # seconds. Longer than that wait, still finite: a vanished Redis is noticed.
                "hosts": [{"address": REDIS_URL, "socket_timeout": 15}],
                "prefix": CHANNEL_LAYER_PREFIX,
                "capacity": 1500,
                # Not below daphne's websocket timeout (a day by default).
                "group_expiry": 86400,
            },
        }
    }
else:
    # Process-local: only `manage.py serve` (web and worker in one process) can use it.
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": 1500},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"
    },
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"  # URL names, resolved by Django
LOGIN_REDIRECT_URL = "fleet"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "build" / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT.mkdir(
    parents=True, exist_ok=True
)  # WhiteNoise warns on every start otherwise
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "controlcenter.storage.ManifestStaticFilesStorage"
    },
}
# Serve straight from the finders when collectstatic has not been run (serve, tests).
WHITENOISE_USE_FINDERS = True
WHITENOISE_MANIFEST_STRICT = False

SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Served over HTTPS (production, .env.example): cookies only over HTTPS, and HSTS. Off by
# default so a fresh checkout on http://127.0.0.1 can log in. Django sends the HSTS header
# on HTTPS requests only.
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", "False")
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", "False")
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", "False")
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", "False")
SILENCED_SYSTEM_CHECKS = [
    # SECURE_SSL_REDIRECT: the reverse proxy that terminates TLS redirects http to https.
    # Django cannot tell a proxied https request from http without a trusted proxy header,
    # so its redirect would loop there, and it would break the container's plain-http probe.
    "security.W008",
    # SECURE_HSTS_PRELOAD: asking browsers to hard-code the whole registrable domain as
    # https-only is the domain owner's commitment (hstspreload.org), not a default of ours;
    # the variable is there for whoever makes it.
    "security.W021",
]

# --- Logins, proxies, email ----------------------------------------------------------------
# Every login's password check goes through the throttle (fleet/throttle.py).
AUTHENTICATION_BACKENDS = ["fleet.auth.ThrottledModelBackend"]

# Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or
# networks, comma-separated); controlcenter/proxy.py applies them. Unset: the headers are
# dropped and the client address is the TCP peer.
TRUSTED_PROXIES = [
    p.strip()
    for p in os.getenv("CONTROLCENTER_TRUSTED_PROXIES", "").split(",")
    if p.strip()
]
try:
    from controlcenter.proxy import parse_networks

    parse_networks(TRUSTED_PROXIES)
except ValueError:
    raise ImproperlyConfigured(
        "CONTROLCENTER_TRUSTED_PROXIES must list IP addresses or networks, comma-separated"
    ) from None
if TRUSTED_PROXIES:
    # Only a trusted proxy's X-Forwarded-Proto reaches Django (controlcenter/proxy.py).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# The one email configuration (password reset; later, alerts): EMAIL_URL as dj-email-url
# reads it, e.g. smtp://user:password@mail.example.com:587/?tls=True. Unset: no email, and
# no password-reset pages.
EMAIL_URL = envsecret("EMAIL_URL")
EMAIL_CONFIGURED = bool(EMAIL_URL)
if EMAIL_CONFIGURED:
    import dj_email_url

    try:
        _email = dj_email_url.parse(EMAIL_URL)
    except Exception:  # noqa: BLE001 - the URL holds a password: never quote it
        _email = {}
    if "EMAIL_BACKEND" not in _email:
        raise ImproperlyConfigured(
            "EMAIL_URL is not an email URL (smtp://, smtps://, submission://, console://, file://)"
        )
    for _name, _value in _email.items():
        if _value is not None and _value != "":
            globals()[_name] = _value
DEFAULT_FROM_EMAIL = os.getenv("DEFAULT_FROM_EMAIL", "controlcenter@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# --- The gateways -------------------------------------------------------------------------
OPENCLAW_GATEWAY_URL = os.getenv("OPENCLAW_GATEWAY_URL", "")
GATEWAY_REST_URL = os.getenv("GATEWAY_REST_URL", "")
GATEWAY_REST_POLL_INTERVAL = envfloat("GATEWAY_REST_POLL_INTERVAL", 5.0)
GATEWAY_WS_READY_TIMEOUT = envfloat("GATEWAY_WS_READY_TIMEOUT", 30.0)
# How long a worker's claim on a gateway lasts without renewal (another worker takes over after).
GATEWAY_LEASE_SECONDS = envfloat("GATEWAY_LEASE_SECONDS", 15.0)
# Workers share the gateways (fleet/leases.py): each claims up to ceil(gateways / live
# workers) and gives some up only once it holds more than that plus this margin.
GATEWAY_LEASE_MARGIN = envint("GATEWAY_LEASE_MARGIN", 1)
# The fleet page shows a full card per gateway up to this many, a compact table above.
FLEET_CARDS_UP_TO = envint("FLEET_CARDS_UP_TO", 3)
# How long a web request waits for the worker to answer a gateway call.
GATEWAY_CALL_TIMEOUT = envfloat("GATEWAY_CALL_TIMEOUT", 20.0)

# --- Alerts (alerts/): steps the worker runs, and the outbox's retries ---------------------
ALERTS_EVALUATE_INTERVAL = envfloat("ALERTS_EVALUATE_INTERVAL", 5.0)
ALERTS_DELIVER_INTERVAL = envfloat("ALERTS_DELIVER_INTERVAL", 2.0)
ALERTS_RETRY_FIRST = envfloat("ALERTS_RETRY_FIRST", 10.0)  # doubling per failed attempt
ALERTS_RETRY_CAP = envfloat("ALERTS_RETRY_CAP", 3600.0)
ALERTS_MAX_ATTEMPTS = envint("ALERTS_MAX_ATTEMPTS", 12)
ALERTS_SEND_TIMEOUT = envfloat("ALERTS_SEND_TIMEOUT", 10.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": os.getenv("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "websockets": {"level": "WARNING"},
    },
}
