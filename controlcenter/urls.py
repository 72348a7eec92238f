from __future__ import annotations

from django.urls import include, path

from fleet.admin import site as admin_site
from fleet.views import LoginView

urlpatterns = [
    # Django's login with repeated failures throttled (fleet/throttle.py); logout and the
    # rest from auth.urls.
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    # The Control Center's admin site: entered by the admin role, not by staff status.
    path("admin/", admin_site.urls),
    path("", include("fleet.urls")),
    path("", include("chat.urls")),
    path("", include("alerts.urls")),
]
