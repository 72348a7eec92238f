from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.urls import URLPattern, include, path

from fleet.admin import site as admin_site
from fleet.views import LoginView, PasswordResetConfirmView, PasswordResetView

# Django's auth URLs without the password reset, which needs email (see below).
accounts: list[URLPattern] = [
    # Django's login, throttled in the authentication backend (fleet/auth.py).
    path("login/", LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path(
        "password_change/",
        auth_views.PasswordChangeView.as_view(),
        name="password_change",
    ),
    path(
        "password_change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
]
if settings.EMAIL_CONFIGURED:
    # Without an email backend a reset link could go nowhere: the pages do not exist.
    accounts += [
        path("password_reset/", PasswordResetView.as_view(), name="password_reset"),
        path(
            "password_reset/done/",
            auth_views.PasswordResetDoneView.as_view(),
            name="password_reset_done",
        ),
        path(
            "reset/<uidb64>/<token>/",
            PasswordResetConfirmView.as_view(),
            name="password_reset_confirm",
        ),
        path(
            "reset/done/",
            auth_views.PasswordResetCompleteView.as_view(),
            name="password_reset_complete",
        ),
    ]

urlpatterns = [
    path("accounts/", include(accounts)),
    # The Control Center's admin site: entered by the admin role, not by staff status.
    path("admin/", admin_site.urls),
    path("", include("fleet.urls")),
    path("", include("chat.urls")),
    path("", include("alerts.urls")),
    path("", include("approvals.urls")),
    path("", include("cron.urls")),
    path("", include("usage.urls")),
]
